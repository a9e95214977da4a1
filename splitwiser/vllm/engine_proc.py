"""One vLLM engine in a process of its own, owned by a pipeline in the parent.

The process runs vLLM's ``LLMEngine`` with its engine core in-process (no further child), so
the pipeline owns exactly one process per engine: it stops it on close, and the process ends
itself if the parent dies (``PR_SET_PDEATHSIG`` and a parent check). Environment that vLLM
reads at start-up (thread binding, KV space, MPS share, NIXL port) is set before vLLM loads.

Loop: 1) receive requests and aborts  2) step the engine  3) publish new tokens with the
time they came out.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from splitwiser.core.messages import ShutdownMsg
from splitwiser.vllm.messages import (
    EngineAbortMsg,
    EngineControlMsg,
    EngineControlReplyMsg,
    EngineErrorMsg,
    EngineReadyMsg,
    EngineTokensMsg,
)

_POLL_S = 0.2  # idle wait for a message; also how often a dead parent is noticed


@dataclass(frozen=True)
class EngineSpec:
    """How to start one engine: ``EngineArgs`` keywords and the environment it starts in."""

    name: str  # process title, e.g. "sw-vllm-0" (telemetry follows "sw-*")
    engine_args: dict  # vllm.EngineArgs keywords (model, dtype, kv_transfer_config, ...)
    env: dict[str, str] = field(default_factory=dict)  # set before vLLM is imported
    cores: tuple[int, ...] | None = None  # CPU: the cores every thread of the engine runs on


def _die_with_parent(parent_pid: int, from_main_thread: bool) -> None:
    """Linux: SIGKILL this process when the thread that started it ends, if that thread is the
    parent's main thread (its end is the parent's end); otherwise the serve loop notices a dead
    parent within ``_POLL_S``."""
    if not from_main_thread:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # already gone before prctl took effect
        os._exit(1)


def _set_title(name: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(name)
    except ImportError:
        pass


def _bind(cores: tuple[int, ...]) -> None:
    """Run every thread of this engine on ``cores``: vLLM binds its OpenMP threads itself only
    in its multi-process executor. Threads started later (the OpenMP pool at the first parallel
    region, NIXL's) inherit the mask."""
    import torch

    os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    torch.set_num_threads(len(cores))


def _build_engine(spec: EngineSpec):
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(EngineArgs(**spec.engine_args))


def _cache_shape(engine) -> tuple[int | None, int | None]:
    cache = engine.vllm_config.cache_config
    return getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)


def _one_line(exc: BaseException) -> EngineErrorMsg:
    return EngineErrorMsg(" ".join(f"{type(exc).__name__}: {exc}".split())[:600])


def engine_main(spec: EngineSpec, parent: tuple[int, bool], in_conn, out_conn) -> None:
    """The engine process: start vLLM, say ready, then serve until told to stop. ``parent``:
    the parent's pid, and whether its main thread started this process; ``in_conn`` /
    ``out_conn``: this engine's ends of its two pipes."""
    parent_pid = parent[0]
    _die_with_parent(*parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this one stops
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process
    _set_title(spec.name)
    try:
        os.environ.update(spec.env)
        if spec.cores:
            _bind(spec.cores)
        engine = _build_engine(spec)
    except BaseException as exc:
        out_conn.send(_one_line(exc))
        sys.exit(1)
    _set_title(spec.name)  # vLLM may have renamed the process
    out_conn.send(EngineReadyMsg(os.getpid(), *_cache_shape(engine)))
    try:
        _serve(engine, parent_pid, in_conn, out_conn)
    except (BrokenPipeError, EOFError):
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent is gone: nobody to tell, nothing to explain
        raise
    except BaseException as exc:
        out_conn.send(_one_line(exc))
        raise


def _receive(engine, in_conn) -> list:
    """Every message waiting; blocks up to ``_POLL_S`` for the first one while idle."""
    messages = []
    timeout = _POLL_S if not engine.has_unfinished_requests() else 0
    while in_conn.poll(timeout):
        messages.append(in_conn.recv())
        timeout = 0
    return messages


_COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions")


def _control(engine, op: str):
    """What an ``EngineControlMsg`` asks for."""
    if op == "reset_prefix_cache":
        return bool(engine.reset_prefix_cache())
    if op == "counters":  # vLLM's own metrics: they exist only with stats logging on
        if not engine.log_stats:
            return {}
        counters: dict[str, float] = {}
        for metric in engine.get_metrics():
            if metric.name in _COUNTERS:  # summed over labels (engines)
                key = metric.name.removeprefix("vllm:")
                counters[key] = counters.get(key, 0) + metric.value
        return counters
    raise ValueError(f"unknown engine control {op!r}")


def _serve(engine, parent_pid: int, in_conn, out_conn) -> None:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    while True:
        # 1) receive: block only while idle
        messages = _receive(engine, in_conn)
        if os.getppid() != parent_pid:
            return
        for msg in messages:
            if isinstance(msg, ShutdownMsg):
                return
            if isinstance(msg, EngineAbortMsg):
                engine.abort_request([str(msg.request_id)])
                continue
            if isinstance(msg, EngineControlMsg):
                out_conn.send(EngineControlReplyMsg(msg.op, _control(engine, msg.op)))
                continue
            extra = dict(msg.params.pop("extra_args", None) or {})
            if msg.kv_transfer_params is not None:
                extra["kv_transfer_params"] = msg.kv_transfer_params
            params = SamplingParams(
                **msg.params, output_kind=RequestOutputKind.DELTA, extra_args=extra or None
            )
            engine.add_request(
                str(msg.request_id), {"prompt_token_ids": msg.prompt_token_ids}, params
            )
        if not engine.has_unfinished_requests():
            continue
        # 2) step
        outputs = engine.step()
        now = time.monotonic()
        # 3) publish
        for out in outputs:
            done = out.outputs[0] if out.outputs else None
            out_conn.send(
                EngineTokensMsg(
                    request_id=int(out.request_id),
                    token_ids=list(done.token_ids) if done is not None else [],
                    time_s=now,
                    finish_reason=(done.finish_reason if done is not None else "abort")
                    if out.finished
                    else None,
                    kv_transfer_params=getattr(out, "kv_transfer_params", None),
                )
            )
