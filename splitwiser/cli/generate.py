"""``splitwiser generate`` and ``splitwiser model info``."""

from __future__ import annotations

import json

import click

from splitwiser.cli.common import (
    ENGINE_DEFAULTS,
    device_option,
    dtype_option,
    kv_handoff_option,
    kv_memory_options,
    model_option,
)


@click.command()
@click.argument("prompts", nargs=-1, required=True)
@model_option()
@click.option(
    "--prompt-workers", default=ENGINE_DEFAULTS["num_prompt_workers"], show_default=True, type=int
)
@click.option(
    "--token-workers", default=ENGINE_DEFAULTS["num_token_workers"], show_default=True, type=int
)
@device_option()
@dtype_option()
@kv_handoff_option()
@kv_memory_options
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Sampling seed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt.")
def generate(
    prompts,
    model,
    prompt_workers,
    token_workers,
    device,
    dtype,
    kv_handoff,
    enable_prefix_caching,
    gpu_memory_utilization,
    max_new_tokens,
    temperature,
    seed,
    as_json,
) -> None:
    """Generate a continuation for each PROMPT with the split runtime."""
    from splitwiser import SamplingParams, SplitwiserPipeline

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    with SplitwiserPipeline(
        model,
        num_prompt_workers=prompt_workers,
        num_token_workers=token_workers,
        device=device,
        dtype=dtype,
        kv_handoff=kv_handoff,
        enable_prefix_caching=enable_prefix_caching,
        gpu_memory_utilization=gpu_memory_utilization,
    ) as pipe:
        outputs = pipe.generate(list(prompts), params)
    for out in outputs:
        if as_json:
            m = out.metrics
            click.echo(
                json.dumps(
                    {
                        "prompt": out.prompt,
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "finish_reason": out.finish_reason,
                        "ttft_s": m.ttft_s,
                        "tpot_s": m.tpot_s,
                        "e2e_s": m.e2e_s,
                        "handoff_s": m.handoff_s,
                        "num_cached_tokens": out.num_cached_tokens,
                    }
                )
            )
        else:
            click.echo(f"{out.prompt}{click.style(out.text, bold=True)}  [{out.finish_reason}]")


@click.group()
def model() -> None:
    """The embedded default model and the random presets."""


@model.command("info")
@click.option("--model", "spec", default=None, help="Describe this model instead of the default.")
def model_info(spec) -> None:
    """Build (on first use) and describe a model: where it is cached, its shape and size."""
    import torch

    from splitwiser.models.loader import load_model
    from splitwiser.models.presets import PRESETS
    from splitwiser.models.registry import resolve_model_impl
    from splitwiser.models.shape import ModelShape

    loaded = load_model(
        spec,
        dtype=torch.float32,
        device=torch.device("meta" if spec and spec.startswith("random:") else "cpu"),
    )
    cfg = loaded.model.config
    shape = ModelShape.from_hf(cfg)
    num_params = sum(p.numel() for p in loaded.model.parameters())
    info = {
        "name": loaded.name,
        "source": loaded.source,
        "architecture": cfg.model_type,
        "model_impl": resolve_model_impl(cfg),
        "num_parameters": num_params,
        "weights_bytes_fp32": num_params * 4,
        "num_hidden_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "vocab_size": shape.vocab_size,
        "tokenizer_vocab_size": len(loaded.tokenizer),
        "random_presets": sorted(PRESETS),
    }
    for key, value in info.items():
        click.echo(f"{key:>24}: {value}")
