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

from tqdm import tqdm

from splitwiser.benchmark.config import COLOCATED, BenchConfig
from splitwiser.benchmark.http_system import OpenAIEndpoint, is_http_system
from splitwiser.benchmark.metrics import RequestRecord, phase_summary
from splitwiser.benchmark.replay import REPLAY
from splitwiser.benchmark.telemetry import TelemetryLog, TelemetrySampler
from splitwiser.benchmark.workloads import BenchRequest
from splitwiser.errors import SplitwiserError

WARMUP_OUTPUT_LEN = 4
_CTX = get_context("spawn")  # never fork: CUDA cannot survive it


@dataclass(frozen=True)
class SystemJob:
    """What a system's process needs; every system of a run gets the same requests."""

    name: str  # splitwiser, colocated, sequential, batched or a vLLM system
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


def is_engine_system(name: str) -> bool:
    """Systems on Splitwiser's engine: they report phases and a phase log."""
    return name in ("splitwiser", COLOCATED)


def build_system(job: SystemJob, device, dtype):
    """The system ``job.name`` names, on the resolved device and dtype."""
    from splitwiser.baselines import BatchedPipeline, SequentialPipeline
    from splitwiser.pipeline import pipeline_from_config

    config, pipe_dir = job.config, job.mps_env.get("CUDA_MPS_PIPE_DIRECTORY")
    model = config.engine.model
    if is_http_system(job.name):  # a server of its own: nothing is built here
        return OpenAIEndpoint(job.name, api_key=os.environ.get("OPENAI_API_KEY"))
    if job.name == "splitwiser":
        engine = replace(
            config.engine, device=str(device), dtype=dtype, mps_pipe_dir=pipe_dir,
            mps_thread_percentage=config.mps_split if pipe_dir else None,
        )  # fmt: skip
        return pipeline_from_config(engine)
    if job.name == COLOCATED:  # the same engine options, one worker for both phases
        engine = config.engine
        # as many requests decoding at once as the split system's token workers together (each
        # decodes one token of the step budget)
        seqs = engine.max_num_seqs * engine.num_token_workers
        return pipeline_from_config(replace(
            engine, device=str(device), dtype=dtype, mps_pipe_dir=pipe_dir,
            mps_thread_percentage=None, colocated=True,
            max_num_seqs=min(seqs, engine.max_num_batched_tokens or seqs),
        ))  # fmt: skip
    if job.name == "sequential":
        return SequentialPipeline(model, device=str(device), dtype=dtype)
    if job.name.startswith("vllm"):
        from splitwiser.vllm import SYSTEMS

        options = {"device": str(device), "dtype": dtype, "mps_pipe_dir": pipe_dir,
                   "enforce_eager": config.engine.enforce_eager}  # fmt: skip
        if job.name == "vllm-parallel":
            options["num_engines"] = config.procs  # as many processes as Splitwiser's
        if job.name == "vllm-split" and pipe_dir:
            options["mps_thread_percentage"] = config.mps_split
        return SYSTEMS[job.name](model, **options)
    return BatchedPipeline(model, device=str(device), dtype=dtype, batch_size=config.batch_size)


def phase_counters(name: str, pipe) -> dict:
    """The engine's phase counters now ({} for a system not on the engine)."""
    return dict(pipe.stats()["phases"]) if is_engine_system(name) else {}


def system_facts(job: SystemJob, pipe, records: list[RequestRecord], before: dict) -> dict:
    """What a system reports besides the request metrics; ``before``: its phase counters when
    the measured run began."""
    if job.name.startswith("vllm"):
        return {"engines": pipe.workers(), "stats": pipe.stats()}
    if is_http_system(job.name):
        return {"endpoint": pipe.base_url, "served_model": pipe.model}
    if not is_engine_system(job.name):  # a baseline: no pool, the K/V of generate()'s own cache
        return {"kv_bytes_per_token": pipe.shape.kv_bytes_per_token(pipe.dtype)}
    stats = pipe.stats()
    kv_bytes_per_token = stats["kv_bytes_per_token"]
    facts = {
        "num_kv_blocks": stats["num_kv_blocks"],
        "kv_bytes_per_token": kv_bytes_per_token,
        # prefill, decode (and colocated: mixed) steps as the workers timed them, measured run
        "phases": phase_summary({k: v - before[k] for k, v in stats["phases"].items()}),
        "workers": pipe.workers(),
        "stats": stats,
    }
    if job.name == "splitwiser":
        done = [r for r in records if r.ok]
        moved_nothing = job.config.engine.kv_handoff == "shared"
        # the prompt K/V that stayed in the shared pool instead of travelling to a token worker
        facts["kv_bytes_not_moved"] = (
            sum(r.prompt_len for r in done) * kv_bytes_per_token if moved_nothing else 0
        )
    return facts


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


def warm_up(job: SystemJob, pipe) -> None:
    """The first requests, all at once with short outputs, excluded from every figure."""
    warm = [
        replace(r, arrival_s=0.0, output_len=min(r.output_len, WARMUP_OUTPUT_LEN))
        for r in job.requests[: job.config.warmup_requests]
    ]
    if warm:
        REPLAY[job.name](pipe, warm, job.prompts[: len(warm)], lambda n: None)


def run_system(job: SystemJob) -> SystemRun:
    """Build, warm up, replay and close one system, in this process."""
    device, dtype = start_system(job)
    requests, prompts = job.requests, job.prompts
    with build_system(job, device, dtype) as pipe:
        warm_up(job, pipe)
        before = phase_counters(job.name, pipe)
        bar = tqdm(total=len(requests), desc=f"{job.name:>10}", unit="req", disable=not job.show)
        with bar, TelemetrySampler(device) as telemetry:
            records, duration_s = REPLAY[job.name](pipe, requests, prompts, bar.update)
        extra = system_facts(job, pipe, records, before)
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
