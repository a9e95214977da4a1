"""``splitwiser serve``: an OpenAI-compatible HTTP server over a pipeline. Engine options take
their defaults (and choices) from ``EngineConfig``."""

from __future__ import annotations

import signal

import click

from splitwiser.cli.common import (
    ENGINE_DEFAULTS,
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
from splitwiser.pipeline import _colocated_max_num_seqs as colocated_max_num_seqs

DEFAULT_MAX_BODY_BYTES = 32 << 20  # as splitwiser.server.app's (not imported: keeps --help light)


def _mps_pipe_dir(mode: str, device: str) -> str | None:
    """A running daemon's pipe directory (``splitwiser mps start``). This process runs CUDA
    itself, so it never starts or stops a daemon (stopping one waits for its clients)."""
    from splitwiser import mps

    if mode == "off" or device == "cpu" or not mps.gpu_present():
        if mode == "on":
            raise mps.MPSUnavailableError("--mps: MPS needs a CUDA GPU; run with --no-mps")
        return None
    daemon = mps.find_running()
    if daemon is None and mode == "on":
        raise mps.MPSUnavailableError(
            "--mps: no MPS daemon is running; start one with 'splitwiser mps start'"
        )
    return None if daemon is None else daemon.pipe_dir


@click.command()
@model_option("HF directory, hub id, random:<preset> or default. [default: embedded model]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=int,
    help="Port to listen on (0: any free port; the log says which).",
)
@click.option(
    "--api-key",
    default=None,
    envvar="SPLITWISER_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1/* (also $SPLITWISER_API_KEY).",
)
@click.option(
    "--served-model-name",
    default=None,
    help="The model's name in requests and /v1/models. [default: --model, or default]",
)
@click.option(
    "--chat-template",
    type=click.Path(dir_okay=False),
    default=None,
    help="A Jinja chat template file. [default: the tokenizer's; the embedded model "
    "has a simple one]",
)
@procs_options(
    EngineConfig().num_workers,
    "Worker processes sharing the device (>= 2; ignored with --colocated).",
    "How many of them are prompt workers. [default: procs // 2]",
)
@click.option(
    "--colocated",
    is_flag=True,
    help="ONE worker runs both phases (vLLM v1's step policy) instead of the split.",
)
@mps_options("auto", "CUDA MPS through a daemon already running (splitwiser mps start).")
@mps_split_option("Active thread percentages of prompt and token workers under MPS.")
@device_option()
@dtype_option()
@click.option(
    "--max-model-len", default=None, type=int, help="Context length served. [default: the model's]"
)
@click.option(
    "--max-num-seqs",
    default=None,
    type=int,
    help=f"Requests decoded together by one token worker. [default: "
    f"{ENGINE_DEFAULTS['max_num_seqs']}; with --colocated: {colocated_max_num_seqs(None, None)}, "
    "at most --max-num-batched-tokens, as ColocatedPipeline]",
)
@click.option(
    "--num-kv-blocks",
    default=None,
    type=int,
    help="KV blocks in the pool. [default: sized from the memory]",
)
@click.option(
    "--block-size",
    default=ENGINE_DEFAULTS["block_size"],
    show_default=True,
    type=int,
    help="Tokens per KV block.",
)
@kv_handoff_option()
@kv_memory_options
@model_impl_option()
@phase_priority_option()
@decode_fill_seqs_option()
@phase_control_option()
@click.option(
    "--slo", default=None, metavar="ttft_ms=..,tpot_ms=..",
    help="The latency SLOs --phase-control slo steers by (milliseconds).",
)  # fmt: skip
@enforce_eager_option()
@max_num_batched_tokens_option("Colocated: the token budget of one step. [default: as vLLM]")
@click.option(
    "--shutdown-timeout",
    default=30.0,
    show_default=True,
    type=float,
    help="On SIGTERM or Ctrl-C, seconds in-flight requests get to finish.",
)
@click.option(
    "--max-body-bytes",
    default=DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    type=int,
    help="Request bodies larger than this get a 413.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option("--no-access-log", is_flag=True, help="No log line per HTTP request.")
@click.pass_context
def serve(ctx, model, host, port, api_key, served_model_name, chat_template, procs,
          prompt_procs, colocated, mps_mode, no_mps, mps_split, shutdown_timeout, max_body_bytes,
          log_level, no_access_log, slo, **engine) -> int:  # fmt: skip
    """Serve the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,
    /v1/models), plus /health, /version, /metrics, /tokenize, /detokenize and
    /reset_prefix_cache.

    SIGTERM or Ctrl-C: stop accepting, let requests in flight finish (--shutdown-timeout),
    cancel the rest, close the workers; exit 0 (143 on SIGTERM).
    """
    from splitwiser.benchmark.config import split_procs
    from splitwiser.benchmark.metrics import parse_slo
    from splitwiser.errors import ConfigError

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"splitwiser serve needs {exc.name}: pip install -e '.[serve]' "
            "(fastapi, uvicorn, prometheus-client)"
        ) from None
    from splitwiser.mps import parse_split
    from splitwiser.server.chat import read_chat_template
    from splitwiser.server.launcher import ListenConfig
    from splitwiser.server.launcher import serve as run_server

    if not 0 <= port <= 65535:
        raise click.BadParameter(f"{port} is not a port (0..65535)", param_hint="--port")
    if not shutdown_timeout >= 0:
        raise click.BadParameter("must be >= 0", param_hint="--shutdown-timeout")
    if max_body_bytes < 1:
        raise click.BadParameter("must be >= 1", param_hint="--max-body-bytes")
    if api_key == "":
        raise ConfigError("--api-key is empty")
    spec = None if model in (None, "default") else model
    workers = {} if colocated else split_procs(procs, prompt_procs)
    pipe_dir = _mps_pipe_dir(resolve_mps(ctx, mps_mode, no_mps), engine["device"])
    split = parse_split(mps_split)
    if engine["max_num_seqs"] is None:
        engine["max_num_seqs"] = (
            colocated_max_num_seqs(None, engine["max_num_batched_tokens"])
            if colocated
            else ENGINE_DEFAULTS["max_num_seqs"]
        )
    slos = parse_slo(slo)
    if set(slos) - {"ttft_ms", "tpot_ms"}:
        raise ConfigError("--slo: phase control steers by ttft_ms and tpot_ms only")
    engine["ttft_slo_ms"], engine["tpot_slo_ms"] = slos.get("ttft_ms"), slos.get("tpot_ms")
    config = EngineConfig(
        model=spec, colocated=colocated, mps_pipe_dir=pipe_dir,
        mps_thread_percentage=split if pipe_dir else None, **workers, **engine,
    )  # fmt: skip
    listen = ListenConfig(host=host, port=port, shutdown_timeout_s=shutdown_timeout,
                          log_level=log_level, access_log=not no_access_log)  # fmt: skip
    received = run_server(
        config, listen,
        model_name=served_model_name or model or "default",
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        chat_template=read_chat_template(chat_template),
    )  # fmt: skip
    return 128 + signal.SIGTERM if received == signal.SIGTERM else 0
