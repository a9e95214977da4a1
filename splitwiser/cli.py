"""The ``splitwiser`` command. Errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import fields

import click

from splitwiser.benchmark.config import BenchConfig
from splitwiser.benchmark.workloads import WORKLOADS
from splitwiser.config import EngineConfig
from splitwiser.errors import SplitwiserError

_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}


def _fail(message: str) -> None:
    click.echo(f"splitwiser: error: {message}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Every error -- bad usage or a ``SplitwiserError`` -- is one line and exit code 2."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, standalone_mode=False, obj={"argv": argv}, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(f"{exc.format_message()}{hint}")
        except click.ClickException as exc:
            _fail(exc.format_message())
        except click.Abort:
            click.echo("splitwiser: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SplitwiserError as exc:
            _fail(str(exc))


@click.group(cls=_Group)
@click.version_option(package_name="splitwiser")
def main() -> None:
    """Splitwiser: prompt and token phases in separate worker processes on one device."""


@main.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option(
    "--model",
    default=None,
    help="HF directory, hub id or random:<preset>. [default: embedded model]",
)
@click.option(
    "--prompt-workers", default=_DEFAULTS["num_prompt_workers"], show_default=True, type=int
)
@click.option(
    "--token-workers", default=_DEFAULTS["num_token_workers"], show_default=True, type=int
)
@click.option("--device", default=_DEFAULTS["device"], show_default=True)
@click.option(
    "--dtype",
    default=None,
    help="float32, bfloat16 or float16. [default: float32 on CPU, bfloat16 on CUDA]",
)
@click.option(
    "--kv-handoff", type=click.Choice(["shared", "copy"]), default="shared", show_default=True
)
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
                    }
                )
            )
        else:
            click.echo(f"{out.prompt}{click.style(out.text, bold=True)}  [{out.finish_reason}]")


def _csv_list(text: str) -> tuple[str, ...]:
    return () if text.strip() == "none" else tuple(x.strip() for x in text.split(",") if x.strip())


_BENCH = {f.name: f.default for f in fields(BenchConfig)}


@main.command()
@click.option(
    "--model",
    default=None,
    help="HF directory, hub id or random:<preset>. [default: embedded model]",
)
@click.option(
    "--procs",
    default=_BENCH["procs"],
    show_default=True,
    type=int,
    help="Worker processes sharing the device (>= 2).",
)
@click.option(
    "--prompt-procs",
    default=None,
    type=int,
    help="How many of them are prompt workers. [default: procs // 2; the rest decode]",
)
@click.option(
    "--mps",
    "mps_mode",
    type=click.Choice(["on", "off", "auto"]),
    is_flag=False,
    flag_value="on",
    default=_BENCH["mps"],
    show_default=True,
    help="CUDA MPS: --mps requires it, --mps auto uses it where available.",
)
@click.option("--no-mps", "no_mps", is_flag=True, help="Run without MPS (same as --mps off).")
@click.option(
    "--mps-split",
    default=None,
    metavar="P,T",
    help="Active thread percentages of prompt and token workers under MPS, e.g. 70,30.",
)
@click.option(
    "--kv-handoff",
    type=click.Choice(["shared", "copy"]),
    default="shared",
    show_default=True,
    help="shared: block ids only; copy: K/V bytes through the queue (for comparison).",
)
@click.option(
    "--workload",
    type=click.Choice(list(WORKLOADS)),
    default=_BENCH["workload"],
    show_default=True,
    help="Fixed lengths, or the Azure 2023 code / conversation traces.",
)
@click.option(
    "--num-requests",
    default=_BENCH["num_requests"],
    show_default=True,
    type=int,
    help="Requests per system (trace workloads: the trace's first N).",
)
@click.option(
    "--input-len",
    default=_BENCH["input_len"],
    show_default=True,
    type=int,
    help="Prompt tokens (fixed workload).",
)
@click.option(
    "--output-len",
    default=_BENCH["output_len"],
    show_default=True,
    type=int,
    help="Output tokens (fixed workload).",
)
@click.option(
    "--rate",
    default=None,
    type=float,
    help="Poisson arrivals at this many requests/s. [default: all at once]",
)
@click.option(
    "--trace-speedup",
    default=None,
    type=float,
    help="Replay the trace's arrival times divided by this (trace workloads).",
)
@click.option(
    "--max-context",
    default=None,
    type=int,
    help="Cap prompt + output tokens per request. [default: the model's context]",
)
@click.option(
    "--length-scale",
    default=_BENCH["length_scale"],
    show_default=True,
    type=float,
    help="Multiply trace lengths by this before capping (for small machines).",
)
@click.option(
    "--baseline",
    "baselines",
    default="sequential,batched",
    show_default=True,
    help="Comma list of sequential, batched; or none.",
)
@click.option(
    "--batch-size",
    default=_BENCH["batch_size"],
    show_default=True,
    type=int,
    help="Static batch size of the batched baseline.",
)
@click.option(
    "--slo",
    default=None,
    metavar="ttft_ms=..,tpot_ms=..",
    help="SLOs for request_goodput (keys ttft_ms, tpot_ms, e2el_ms).",
)
@click.option(
    "--seed",
    default=_BENCH["seed"],
    show_default=True,
    type=int,
    help="Seed of prompts and Poisson arrivals.",
)
@click.option("--device", default=_BENCH["device"], show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--dtype",
    default=None,
    help="float32, bfloat16 or float16. [default: float32 on CPU, bfloat16 on CUDA]",
)
@click.option(
    "--num-warmup",
    default=None,
    type=int,
    help="Warm-up requests per system, excluded. [default: max(2, procs)]",
)
@click.option(
    "--out",
    default=_BENCH["out"],
    show_default=True,
    type=click.Path(file_okay=False),
    help="Results root; the run writes OUT/<run-id>/.",
)
@click.option(
    "--run-id", default=None, help="Name of the run's folder. [default: date-time-workload-device]"
)
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.pass_context
def bench(ctx, no_mps, mps_mode, mps_split, baselines, slo, no_plots, **options) -> None:
    """Replay a workload through Splitwiser and the baselines; print and save the comparison.

    Every system gets the same prompt token ids, forced output lengths and arrival schedule;
    warm-up requests are excluded from every system alike.
    """
    from splitwiser.benchmark import run_bench
    from splitwiser.benchmark.metrics import parse_slo
    from splitwiser.benchmark.report import comparison_table
    from splitwiser.mps import parse_split

    if no_mps and ctx.get_parameter_source("mps_mode") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --mps or --no-mps, not both")
    config = BenchConfig(
        mps="off" if no_mps else mps_mode,
        mps_split=parse_split(mps_split),
        baselines=_csv_list(baselines),
        slo=parse_slo(slo),
        plots=not no_plots,
        **options,
    )
    command = shlex.join(["splitwiser", *ctx.obj["argv"]]) if ctx.obj else None
    result = run_bench(config, command=command, show=True)
    click.echo(comparison_table(result.summary))
    click.echo(f"results: {result.run_dir}")


@main.group(name="mps")
def mps_group() -> None:
    """The CUDA MPS control daemon: start (or reuse), stop what splitwiser started, status."""


@mps_group.command("start")
def mps_start() -> None:
    """Start a private MPS control daemon, or report the one already running."""
    from splitwiser import mps

    daemon = mps.start_daemon()
    if daemon.owned:
        mps.record(daemon)
        click.echo(f"started the MPS control daemon (pid {daemon.pid}), pipe {daemon.pipe_dir}")
    else:
        click.echo(f"an MPS control daemon already runs on {daemon.pipe_dir}; it stays running")
    click.echo(f"clients need: export CUDA_MPS_PIPE_DIRECTORY={daemon.pipe_dir}")


@mps_group.command("stop")
def mps_stop() -> None:
    """Stop the daemon that `splitwiser mps start` started; never any other."""
    from splitwiser import mps

    daemon = mps.stop_recorded()
    if daemon is None:
        click.echo("no MPS daemon started by splitwiser is recorded; nothing stopped")
    else:
        click.echo(f"stopped the MPS control daemon on {daemon.pipe_dir}")


@mps_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def mps_status(as_json) -> None:
    """Where the control binary is, and which daemon runs."""
    from splitwiser import mps

    recorded = mps.load_recorded()
    running = mps.find_running() if mps.find_control_binary() else None
    info = {
        "control_binary": mps.find_control_binary(),
        "started_by_splitwiser": recorded.status() if recorded else None,
        "running": running.status() if running else None,
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"control binary: {info['control_binary'] or 'not found on PATH'}")
    click.echo(f"started by splitwiser: {info['started_by_splitwiser'] or 'none'}")
    click.echo(f"running daemon: {info['running'] or 'none'}")


@main.group()
def model() -> None:
    """The embedded default model and the random presets."""


@model.command("info")
@click.option("--model", "spec", default=None, help="Describe this model instead of the default.")
def model_info(spec) -> None:
    """Build (on first use) and describe a model: where it is cached, its shape and size."""
    import torch

    from splitwiser.models.loader import load_model
    from splitwiser.models.presets import PRESETS

    loaded = load_model(
        spec,
        dtype=torch.float32,
        device=torch.device("meta" if spec and spec.startswith("random:") else "cpu"),
    )
    cfg = loaded.model.config
    num_params = sum(p.numel() for p in loaded.model.parameters())
    info = {
        "name": loaded.name,
        "source": loaded.source,
        "architecture": cfg.model_type,
        "num_parameters": num_params,
        "weights_bytes_fp32": num_params * 4,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "tokenizer_vocab_size": len(loaded.tokenizer),
        "random_presets": sorted(PRESETS),
    }
    for key, value in info.items():
        click.echo(f"{key:>24}: {value}")
