"""One system of a benchmark run (Splitwiser or a baseline), in a process of its own.

The run's process spawns one child per system, one after another, and never touches CUDA
itself. Two things follow:

- Under MPS, the process that stops the daemon is never one of its clients: the daemon's
  ``quit`` waits for every client, so a client that stops it would wait on itself.
- A system leaves nothing on the device to the next: CUDA IPC memory that a killed worker never
  released stays in its producer's pending-release list, and the producer (the child) exits.

In the child: build the system, warm it up (the first requests, short outputs, excluded from
the figures), replay the workload under telemetry, close it, and send back what it measured.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from dataclasses import dataclass, replace
from multiprocessing import get_context, resource_tracker
from typing import TYPE_CHECKING

from tqdm import tqdm

from splitwiser.benchmark.metrics import RequestRecord, kv_cache_summary
from splitwiser.benchmark.telemetry import TelemetryLog, TelemetrySampler
from splitwiser.benchmark.workloads import BenchRequest
from splitwiser.errors import SplitwiserError
from splitwiser.systems import BenchSystem, get_system

if TYPE_CHECKING:
    from splitwiser.benchmark.config import BenchConfig

WARMUP_OUTPUT_LEN = 4
_CTX = get_context("spawn")  # never fork: CUDA cannot survive it


@dataclass(frozen=True)
class SystemJob:
    """What a system's process needs; every system of a run gets the same requests."""

    name: str  # the system's spec (see splitwiser.systems.get_system)
    config: BenchConfig
    device: str  # resolved by the run ("cpu", "cuda"), never "auto"
    mps_env: dict[str, str]  # CUDA_MPS_* set before this process touches CUDA; {} without MPS
    requests: list[BenchRequest]
    prompts: list[list[int]]  # token ids, one per request
    show: bool  # progress bar


@dataclass
class SystemRun:
    name: str
    records: list[RequestRecord]
    duration_s: float
    telemetry: TelemetryLog
    extra: dict  # system-specific facts (workers, pool size, phases)
    pid: int  # the process the system ran in
    device_info: dict  # the GPU as this process saw it ({} on CPU)


def build_system(job: SystemJob, device, dtype) -> BenchSystem:
    """The system ``job.name`` names, on the resolved device and dtype."""
    pipe_dir = job.mps_env.get("CUDA_MPS_PIPE_DIRECTORY")
    return get_system(job.name).build(job.name, job.config, device, dtype, pipe_dir)


def device_info(device) -> dict:
    import torch

    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda}  # fmt: skip


def start_system(job: SystemJob):
    """In the system's process: join MPS, resolve the device, then (device, dtype)."""
    from splitwiser.config import resolve_device, resolve_dtype

    os.environ.update(job.mps_env)  # before anything here initialises CUDA
    device = resolve_device(job.device)
    return device, resolve_dtype(job.config.engine.dtype, device)


def warm_up(job: SystemJob, system: BenchSystem) -> None:
    """The first requests, all at once with short outputs, excluded from every figure (a
    conversation's first turns only: a later turn needs the answers before it)."""
    firsts = [(r, p) for r, p in zip(job.requests, job.prompts) if not r.is_follow_up]
    warm = [
        (replace(r, arrival_s=0.0, output_len=min(r.output_len, WARMUP_OUTPUT_LEN),
                 max_tokens=None, conversation=None, turn=0), p)
        for r, p in firsts[: job.config.warmup_requests]
    ]  # fmt: skip
    if warm:
        system.replay([r for r, _ in warm], [p for _, p in warm], lambda n: None)


def start_measuring(system: BenchSystem) -> dict:
    """Right before a measured run: empty the prefix cache (what the warm-up or an earlier
    point cached would serve this run's prompts in one system and not in another) and take
    the KV counters; ``kv_cache_facts`` turns them into the run's figures."""
    return {"reset": system.reset_prefix_cache(), "counters": system.cache_counters()}


def kv_cache_facts(system: BenchSystem, start: dict) -> dict:
    """The prefix cache's hits and queries and the preemptions of the run since
    ``start_measuring``, whether the cache was emptied first, and the pool's size in tokens."""
    return {
        **kv_cache_summary(start["counters"] or {}, system.cache_counters() or {}),
        "prefix_cache_reset": start["reset"],
        "kv_pool_tokens": system.kv_pool_tokens(),
    }


def run_system(job: SystemJob) -> SystemRun:
    """Build, warm up, replay and close one system, in this process."""
    device, dtype = start_system(job)
    requests, prompts = job.requests, job.prompts
    with build_system(job, device, dtype) as system:
        warm_up(job, system)
        before = system.phase_counters()
        start = start_measuring(system)
        bar = tqdm(total=len(requests), desc=f"{job.name:>10}", unit="req", disable=not job.show)
        with bar, TelemetrySampler(device) as telemetry:
            records, duration_s = system.replay(requests, prompts, bar.update)
        extra = system.facts(job.config, records, before)
        extra["kv_cache"] = kv_cache_facts(system, start)
    return SystemRun(
        job.name, records, duration_s, telemetry, extra, os.getpid(), device_info(device)
    )


def _child_main(target, job, conn) -> None:
    """The system's process: one message back, ("ok", target(job)) or ("error", exception)."""
    try:
        # SIGINT came blocked (see run_in_child): from here a Ctrl-C ends this run quietly
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        message = ("ok", target(job))
    except KeyboardInterrupt:
        sys.exit(130)
    except SplitwiserError as exc:  # bad input or a documented failure: one line upstairs
        message = ("error", exc)
    except BaseException as exc:
        traceback.print_exc()
        message = ("error", SplitwiserError(f"the {job.name} run failed: {exc!r}"))
    try:
        conn.send(message)
    except Exception as exc:  # an exception that does not pickle
        conn.send(("error", SplitwiserError(f"the {job.name} run failed: {exc!r}")))
    conn.close()


def _stop(proc, grace_s: float) -> None:
    """Let the child end on its own for ``grace_s``, then Ctrl-C, terminate, kill."""
    proc.join(grace_s)
    for stop in (lambda: os.kill(proc.pid, signal.SIGINT), proc.terminate, proc.kill):
        if proc.exitcode is not None:
            return
        stop()
        proc.join(10.0)


def run_in_child(job, target=run_system):
    """``target(job)`` (default: one system's run) in a fresh process; waits for it and returns
    its result; its errors are raised here. ``target`` is a module-level function and ``job``
    has a ``name``."""
    result_conn, child_conn = _CTX.Pipe(duplex=False)
    proc = _CTX.Process(
        target=_child_main, args=(target, job, child_conn), name=f"bench-{job.name}"
    )
    # NOTE: the child inherits a blocked SIGINT through exec, so a Ctrl-C while it starts up
    # waits until _child_main can end it quietly; the resource tracker first, as its start
    # unblocks SIGINT on its way out
    resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    child_conn.close()
    try:
        try:
            status, value = result_conn.recv()
        except EOFError:  # died without a word: killed, out of memory
            proc.join(10.0)
            raise SplitwiserError(
                f"the {job.name} run's process ended without a result (exit code {proc.exitcode})"
            ) from None
        proc.join(60.0)
    except KeyboardInterrupt as exc:
        # a Ctrl-C reached the whole process group, the child included: give it time to close
        # its workers; anything else (the CLI's SIGTERM) reached this process alone: pass it on
        _stop(proc, grace_s=30.0 if type(exc) is KeyboardInterrupt else 0.0)
        raise
    finally:
        result_conn.close()
        if proc.exitcode is None:
            _stop(proc, grace_s=0.0)
    if status == "error":
        raise value
    return value
