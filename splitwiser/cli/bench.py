"""``splitwiser bench``: the comparison driver's command line. The options it shares with
``splitwiser sweep`` (the systems' engine, the workload, the output) are defined here once."""

from __future__ import annotations

from dataclasses import fields

import click

from splitwiser.benchmark.config import DEFAULT_PROCS, BenchConfig
from splitwiser.benchmark.workloads import WORKLOADS
from splitwiser.cli.common import (
    ENGINE_DEFAULTS,
    command_line,
    decode_fill_seqs_option,
    device_option,
    dtype_option,
    enforce_eager_option,
    kv_handoff_option,
    kv_memory_options,
    max_num_batched_tokens_option,
    model_impl_option,
    model_option,
    mps_options,
    mps_split_option,
    phase_control_option,
    phase_priority_option,
    procs_options,
    resolve_mps,
)
from splitwiser.config import EngineConfig
from splitwiser.errors import ConfigError
from splitwiser.systems import KNOWN_BASELINES


def csv_list(text: str) -> tuple[str, ...]:
    return () if text.strip() == "none" else tuple(x.strip() for x in text.split(",") if x.strip())


_BENCH = {f.name: f.default for f in fields(BenchConfig)}
BASELINE_HELP = (
    f"Comma list of {', '.join(KNOWN_BASELINES)}; or none (colocated: one worker running both "
    "phases on Splitwiser's engine; the vLLM systems need vLLM: bash bench/install_vllm_cpu.sh "
    "on CPU); or http://HOST:PORT/v1: an OpenAI-compatible server, streamed, timed per chunk "
    "($OPENAI_API_KEY if it needs a key)."
)

# in --help order: the systems, then the workload, then the run
_SHARED = (
    model_option(),
    procs_options(DEFAULT_PROCS, "Worker processes sharing the device (>= 2).",
                  "How many of them are prompt workers. [default: procs // 2; the rest decode]"),
    mps_options(_BENCH["mps"], "CUDA MPS: --mps requires it, --mps auto uses it where available."),
    kv_handoff_option(),
    kv_memory_options,
    model_impl_option(),
    phase_priority_option(),
    decode_fill_seqs_option(),
    phase_control_option(),
    enforce_eager_option(
        "CUDA: run decode without CUDA graphs; vLLM systems: no compilation either."
    ),
    max_num_batched_tokens_option(
        "The colocated baseline's token budget per step (decodes first, then prefill chunks). "
        "[default: as vLLM, 2048 on CPU and smaller GPUs]"
    ),
    click.option("--workload", type=click.Choice(list(WORKLOADS)), default=_BENCH["workload"],
                 show_default=True,
                 help="Fixed lengths; the Azure 2023 code / conversation traces; "
                 "prefix-repetition: a few long prefixes, each followed by many short suffixes "
                 "of its own (vLLM's prefix_repetition); multi-turn: conversations of the "
                 "azure-conv trace, each turn sending the whole history (previous prompts and "
                 "answers) plus a new message once the previous answer arrived."),
    click.option("--num-requests", default=_BENCH["num_requests"], show_default=True, type=int,
                 help="Requests per system (trace workloads: the trace's first N)."),
    click.option("--input-len", default=_BENCH["input_len"], show_default=True, type=int,
                 help="Prompt tokens (fixed workload)."),
    click.option("--output-len", default=_BENCH["output_len"], show_default=True, type=int,
                 help="Output tokens (fixed and prefix-repetition workloads)."),
    click.option("--prefix-repetition-prefix-len", default=_BENCH["prefix_repetition_prefix_len"],
                 show_default=True, type=int,
                 help="prefix-repetition: tokens of each shared prefix."),
    click.option("--prefix-repetition-suffix-len", default=_BENCH["prefix_repetition_suffix_len"],
                 show_default=True, type=int,
                 help="prefix-repetition: each request's own tokens after its prefix."),
    click.option("--prefix-repetition-num-prefixes",
                 default=_BENCH["prefix_repetition_num_prefixes"], show_default=True, type=int,
                 help="prefix-repetition: prefixes; num-requests // this requests share each."),
    click.option("--think-time", "think_time_s", default=_BENCH["think_time_s"],
                 show_default=True, type=float,
                 help="multi-turn: seconds from an answer's last token to the next turn."),
    click.option("--max-tokens-factor", default=_BENCH["max_tokens_factor"], show_default=True,
                 type=int,
                 help="Every request asks for this many times its output length (max_tokens, "
                 "capped to the context), as chat clients ask for more than they will get; the "
                 "client cancels it once it received the workload's output length (a user "
                 "closing the stream), so every system still produces and is timed on exactly "
                 "that length. Shows what reserving KV for max_tokens costs. The generate() "
                 "baselines (sequential, batched) reserve nothing and ask for the length."),
    click.option("--kv-cache-tokens", default=None, type=int,
                 help="The KV pool in tokens, for every system alike: Splitwiser's and "
                 "colocated's num_kv_blocks = this / block size; the vLLM systems' KV cache "
                 "the bytes of as many tokens (on CPU vLLM's blocks are 128 tokens: give a "
                 "multiple of 128). [default: 1 GiB each on CPU; on CUDA by memory fraction]"),
    click.option("--max-context", default=None, type=int,
                 help="Cap prompt + output tokens per request. [default: the model's context]"),
    click.option("--length-scale", default=_BENCH["length_scale"], show_default=True,
                 type=float,
                 help="Multiply trace lengths by this before capping (for small machines)."),
    click.option("--batch-size", default=_BENCH["batch_size"], show_default=True, type=int,
                 help="Static batch size of the batched baseline."),
    click.option("--seed", default=_BENCH["seed"], show_default=True, type=int,
                 help="Seed of prompts and Poisson arrivals."),
    device_option(),
    dtype_option(),
    click.option("--num-warmup", default=None, type=int,
                 help="Warm-up requests per system, excluded. [default: max(2, procs)]"),
    click.option("--out", default=_BENCH["out"], show_default=True,
                 type=click.Path(file_okay=False),
                 help="Results root; the run writes OUT/<run-id>/."),
    click.option("--run-id", default=None,
                 help="Name of the run's folder. [default: date-time-workload-device]"),
    click.option("--no-plots", is_flag=True, help="Skip the PNG plots."),
)  # fmt: skip


def shared_options(fn):
    """The options of ``bench`` and ``sweep`` alike, listed in --help in ``_SHARED``'s order."""
    for option in reversed(_SHARED):
        fn = option(fn)
    return fn


def bench_config(ctx, *, no_mps, mps_mode, procs, prompt_procs, no_plots, **options) -> BenchConfig:
    """The ``BenchConfig`` of the shared options plus ``options`` (BenchConfig fields): the
    options that are EngineConfig fields become the Splitwiser system's engine."""
    from splitwiser.benchmark.config import split_procs

    # the Splitwiser system's options: the options of this command that are EngineConfig fields
    engine = {name: options.pop(name) for name in list(options) if name in ENGINE_DEFAULTS}
    kv_cache_tokens = options.pop("kv_cache_tokens", None)
    if kv_cache_tokens is not None:
        block_size = engine.get("block_size", ENGINE_DEFAULTS["block_size"])
        if kv_cache_tokens < block_size or kv_cache_tokens % block_size:
            raise ConfigError(f"--kv-cache-tokens must be a positive multiple of the block size "
                              f"({block_size}), got {kv_cache_tokens}")  # fmt: skip
        engine["num_kv_blocks"] = kv_cache_tokens // block_size
    if engine.get("phase_control") == "slo":  # it steers by the run's SLOs; a sweep's
        # multiples are resolved against the system's own single request once it is timed
        slo = options.get("slo") or {}
        engine["ttft_slo_ms"], engine["tpot_slo_ms"] = slo.get("ttft_ms"), slo.get("tpot_ms")
    return BenchConfig(
        engine=EngineConfig(**split_procs(procs, prompt_procs), **engine),
        mps=resolve_mps(ctx, mps_mode, no_mps),
        plots=not no_plots,
        **options,
    )


@click.command()
@shared_options
@mps_split_option(
    "Active thread percentages of prompt and token workers under MPS, e.g. 70,30. "
    "[default: none, every worker may use all SMs]"
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
    help="Replay the trace's arrival times divided by this (trace workloads). "
    "[default: all at once unless --rate]",
)
@click.option(
    "--baseline",
    "baselines",
    default=",".join(_BENCH["baselines"]),
    show_default=True,
    help=BASELINE_HELP,
)
@click.option(
    "--slo",
    default=None,
    metavar="ttft_ms=..,tpot_ms=..",
    help="SLOs for request_goodput (keys ttft_ms, tpot_ms, e2el_ms). [default: none, no goodput]",
)
@click.pass_context
def bench(ctx, mps_split, baselines, slo, **options) -> None:
    """Replay a workload through Splitwiser and the baselines; print and save the comparison.

    Every system gets the same prompt token ids, forced output lengths and arrival schedule;
    warm-up requests are excluded from every system alike.
    """
    from splitwiser.benchmark import run_bench
    from splitwiser.benchmark.metrics import parse_slo
    from splitwiser.benchmark.report import comparison_table
    from splitwiser.mps import parse_split

    config = bench_config(
        ctx,
        mps_split=parse_split(mps_split),
        baselines=csv_list(baselines),
        slo=parse_slo(slo),
        **options,
    )
    result = run_bench(config, command=command_line(ctx), show=True)
    click.echo(comparison_table(result.summary))
    click.echo(f"results: {result.run_dir}")
