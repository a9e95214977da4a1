"""Options and helpers shared by the subcommands: each option that several commands take is
declared here once, its default read from ``EngineConfig``."""

from __future__ import annotations

import shlex
from dataclasses import fields

import click

from splitwiser.config import (
    KV_HANDOFF_MODES,
    MODEL_IMPLS,
    PHASE_CONTROLS,
    PHASE_PRIORITIES,
    EngineConfig,
)

ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
MODEL_HELP = "HF directory, hub id or random:<preset>. [default: embedded model]"


def model_option(help: str = MODEL_HELP):
    return click.option("--model", default=ENGINE_DEFAULTS["model"], help=help)


def device_option():
    return click.option(
        "--device", default=ENGINE_DEFAULTS["device"], show_default=True, help="auto, cpu or cuda."
    )


def dtype_option(help: str = "float32, bfloat16 or float16. "
                 "[default: float32 on CPU, bfloat16 on CUDA]"):  # fmt: skip
    return click.option("--dtype", default=ENGINE_DEFAULTS["dtype"], help=help)


def procs_options(default: int, procs_help: str, prompt_procs_help: str):
    """``--procs`` (worker processes) and ``--prompt-procs`` (how many of them prompt workers);
    see ``splitwiser.benchmark.config.split_procs``."""

    def decorate(fn):
        fn = click.option("--prompt-procs", default=None, type=int, help=prompt_procs_help)(fn)
        return click.option(
            "--procs", default=default, show_default=True, type=int, help=procs_help
        )(fn)

    return decorate


def kv_handoff_option():
    return click.option(
        "--kv-handoff", type=click.Choice(KV_HANDOFF_MODES),
        default=ENGINE_DEFAULTS["kv_handoff"], show_default=True,
        help="shared: block ids only; copy: the K/V copied into the token worker's blocks "
        "(device to device on CUDA), for comparison.",
    )  # fmt: skip


def model_impl_option():
    return click.option(
        "--model-impl", type=click.Choice(MODEL_IMPLS), default=ENGINE_DEFAULTS["model_impl"],
        show_default=True,
        help="Splitwiser's own model code (Llama, Mistral, Qwen2, OPT) or the Hugging Face "
        "modules; auto: own code where the architecture has it.",
    )  # fmt: skip


def phase_priority_option():
    return click.option(
        "--phase-priority", type=click.Choice(PHASE_PRIORITIES),
        default=ENGINE_DEFAULTS["phase_priority"], show_default=True,
        help="CPU: whose workers the OS favours on shared cores; prefill: token workers yield "
        "(prompts first, full decode batches), decode: prompt workers yield.",
    )  # fmt: skip


def phase_control_option():
    return click.option(
        "--phase-control", type=click.Choice(PHASE_CONTROLS),
        default=ENGINE_DEFAULTS["phase_control"], show_default=True,
        help="slo: once per window, move the prompt workers' share (how many prefill at once, "
        "the prefill budget) toward the phase whose SLO (--slo) the window's p90 misses; "
        "static: as configured.",
    )  # fmt: skip


def decode_fill_seqs_option():
    return click.option(
        "--decode-fill-seqs", type=click.IntRange(min=0),
        default=ENGINE_DEFAULTS["decode_fill_seqs"], show_default=True,
        help="A prefilled request joins the fullest token worker with fewer than this many "
        "requests (one batch at low load, as one engine's), then the least loaded; 0: always "
        "the least loaded.",
    )  # fmt: skip


def enforce_eager_option(help: str = "CUDA: decode without CUDA graphs."):
    return click.option("--enforce-eager", is_flag=True, help=help)


def max_num_batched_tokens_option(help: str):
    return click.option(
        "--max-num-batched-tokens", default=ENGINE_DEFAULTS["max_num_batched_tokens"], type=int,
        help=help,
    )  # fmt: skip


def _fraction(ctx, param, value: float) -> float:
    if not 0 < value <= 1:
        raise click.BadParameter(f"{value:g} is not in (0, 1]")
    return value


def kv_memory_options(fn):
    """``--enable-prefix-caching/--no-enable-prefix-caching`` (vLLM's spelling; default: on
    wherever the handoff allows it) and ``--gpu-memory-utilization`` (vLLM's meaning): the
    command receives ``enable_prefix_caching`` and ``gpu_memory_utilization``, as
    ``EngineConfig`` names them."""
    fn = click.option(
        "--gpu-memory-utilization", type=float, callback=_fraction,
        default=ENGINE_DEFAULTS["gpu_memory_utilization"], show_default=True,
        help="CUDA: the fraction of the device's memory all of Splitwiser's processes may use "
        "together (weights, workers, KV pool); the rest of it after the weights and the "
        "workers goes to the KV pool. --num-kv-blocks wins.",
    )(fn)  # fmt: skip
    return click.option(
        "--enable-prefix-caching/--no-enable-prefix-caching",
        default=ENGINE_DEFAULTS["enable_prefix_caching"],
        help="Automatic prefix caching: a prompt's cached prefix is not prefilled again. "
        "[default: on, except with --kv-handoff copy]",
    )(fn)  # fmt: skip


def mps_split_option(help: str):
    return click.option("--mps-split", default=None, metavar="P,T", help=help)


def mps_options(default: str, help: str):
    """``--mps [on|off|auto]`` (bare ``--mps`` means on) and ``--no-mps``; the command receives
    one ``mps`` argument."""

    def decorate(fn):
        fn = click.option("--no-mps", "no_mps", is_flag=True, help="Same as --mps off.")(fn)
        return click.option(
            "--mps", "mps_mode", type=click.Choice(["on", "off", "auto"]), is_flag=False,
            flag_value="on", default=default, show_default=True, help=help,
        )(fn)  # fmt: skip

    return decorate


def resolve_mps(ctx: click.Context, mps_mode: str, no_mps: bool) -> str:
    if no_mps and ctx.get_parameter_source("mps_mode") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --mps or --no-mps, not both")
    return "off" if no_mps else mps_mode


def command_line(ctx: click.Context) -> str | None:
    """The command as typed, for the results."""
    return shlex.join(["splitwiser", *ctx.obj["argv"]]) if ctx.obj else None
