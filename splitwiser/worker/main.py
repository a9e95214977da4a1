"""The worker processes: a prompt worker runs batched prefill, a token worker runs continuous-batch
decode. Both map the parent's weights and KV pool (shared memory on CPU, CUDA IPC on GPU)."""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
from dataclasses import dataclass, replace

import psutil
import torch

from splitwiser.config import EngineConfig
from splitwiser.core import messages as m
from splitwiser.kv.pool import KVLayout, prefill_workspace_bytes
from splitwiser.layers.linear import bound_primitive_caches
from splitwiser.models.shape import ModelShape
from splitwiser.worker.decode_batch import DecodeBatch
from splitwiser.worker.heap import keep_freed_memory, reserve_heap
from splitwiser.worker.model_runner import ModelRunner, graph_batch_sizes


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker runs with: the pipeline's own config, the worker's role and index, and
    the facts the parent resolved once (device, front-end, context length, end-of-sequence ids).
    One per worker, made with ``dataclasses.replace``."""

    engine: EngineConfig
    device: str  # resolved: "cpu" or "cuda:<index>"
    model_impl: str  # resolved: "splitwiser" or "transformers" (splitwiser.models.registry)
    max_model_len: int  # prompt + output tokens of one request (sliding window applied)
    eos_token_ids: tuple[int, ...]
    max_num_batched_tokens: int = 2048  # colocated: resolved step budget (EngineConfig's)
    role: str = "prompt"  # "prompt", "token" or "colocated"
    index: int = 0
    # NVTX ranges per prefill batch / decode step (CUDA only): asked for (nvtx_ranges) or a
    # profiler attached (see for_attached_profiler)
    nvtx: bool = False

    @property
    def name(self) -> str:
        return f"splitwiser-{self.role}-{self.index}"

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    @property
    def kv_handoff(self) -> str:
        return self.engine.kv_handoff

    @property
    def max_num_seqs(self) -> int:  # token worker: running requests per decode step
        return self.engine.max_num_seqs

    @property
    def max_prefill_tokens(self) -> int:  # prompt worker: tokens of its largest prefill batch
        return self.engine.max_prefill_tokens

    @property
    def enforce_eager(self) -> bool:  # token worker on CUDA: no decode CUDA graphs
        return self.engine.enforce_eager

    @property
    def num_threads(self) -> int:
        return self.engine.threads_per_worker()

    @property
    def env(self) -> dict[str, str]:  # set before CUDA starts (MPS pipe, thread share)
        return self.engine.worker_env(self.role)

    @property
    def nice(self) -> int:  # added to the process's niceness (EngineConfig.phase_priority)
        return self.engine.worker_nice(self.role, torch.device(self.device))


def _uss() -> int:
    return psutil.Process().memory_full_info().uss


def get_msg(in_conn, block: bool):
    """The next message (``queue.Empty`` if none and not blocking); exit when the parent is gone
    (never leave an orphan)."""
    if block:
        parent = os.getppid()
        while not in_conn.poll(1.0):
            if os.getppid() != parent:
                raise SystemExit("parent process died")
    elif not in_conn.poll(0):
        raise queue.Empty
    try:
        return in_conn.recv()
    except EOFError:
        raise SystemExit("the parent closed the channel") from None


_NO_RANGE = contextlib.nullcontext()


@contextlib.contextmanager
def _nvtx(role: str, name: str):
    # nested push/pop ranges: Nsight shows "prompt/prefill b=4 t=2048", and ncu filters a phase
    # with --nvtx-include "prompt/"
    torch.cuda.nvtx.range_push(role)
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
        torch.cuda.nvtx.range_pop()


def profiler_attached() -> bool:
    """Nsight Systems and Nsight Compute hand NVTX calls to their collector through this
    variable, which the workers inherit from the profiled process."""
    return bool(os.environ.get("NVTX_INJECTION64_PATH"))


def for_attached_profiler(cfg: WorkerConfig) -> WorkerConfig:
    """Decided once at start-up: ranges for a profiler that attached itself, even if
    ``nvtx_ranges`` was not asked for."""
    return replace(cfg, nvtx=True) if profiler_attached() and not cfg.nvtx else cfg


def phase_range(cfg: WorkerConfig, device: torch.device, name: str):
    """An NVTX range named by phase and shape when profiling (``cfg.nvtx``: asked for, or a
    profiler attached, see ``worker_main``); otherwise a shared no-op."""
    if cfg.nvtx and device.type == "cuda":
        return _nvtx(cfg.role, name)
    return _NO_RANGE


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settle(device: torch.device) -> None:
    """After a failed step: let kernels already queued finish writing into the requests' blocks
    before the parent hands those blocks to someone else."""
    try:
        synchronize(device)
    except Exception:  # a broken context: nothing more will run on it anyway
        pass


def worker_main(cfg: WorkerConfig, payload: bytes, in_conn, out_conn) -> None:
    """Entry point of a spawned worker. ``payload`` pickles (model, kv_pool) as shared handles."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops its workers.
    # SIGINT arrives blocked (see WorkerProc): ignore it, then unblock, dropping one pending
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # NOTE: before anything touches CUDA: the driver reads the MPS variables when it initialises
    os.environ.update(cfg.env)
    try:
        with open("/proc/self/comm", "w") as f:  # visible in `ps`: sw-prompt-0, sw-token-1
            f.write(f"sw-{cfg.role}-{cfg.index}"[:15])
    except OSError:
        pass
    cfg = for_attached_profiler(cfg)
    keep_freed_memory()
    bound_primitive_caches()
    torch.set_num_threads(cfg.num_threads)
    if cfg.nice:
        os.nice(cfg.nice)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    uss_before = _uss()
    model, kv_pool = pickle.loads(payload)  # maps the parent's storages: no copy
    params = list(model.parameters())
    for p in params:  # touch every page so USS shows whether the weights are private or shared
        p.sum()
    uss_after = _uss()
    graphs = device.type == "cuda" and cfg.model_impl == "splitwiser" and not cfg.enforce_eager
    runner = ModelRunner(
        model, cfg.block_size, device, model_impl=cfg.model_impl,
        max_model_len=cfg.max_model_len, fuse=graphs,
    )  # fmt: skip
    reserved = 0
    if cfg.role != "token" and device.type == "cpu":  # the prefill's temporaries
        shape = ModelShape.from_hf(model.config)
        layout = KVLayout.from_shape(shape, cfg.block_size, params[0].dtype)
        step = cfg.max_prefill_tokens if cfg.role == "prompt" else cfg.max_num_batched_tokens
        reserved = prefill_workspace_bytes(model.config, layout, step)
        reserve_heap(reserved)
    batch = None
    if cfg.role in ("token", "colocated"):  # both decode from a persistent batch
        batch = _decode_batch(cfg, kv_pool, device)
        if graphs:
            runner.capture_decode_graphs(batch, kv_pool, graph_batch_sizes(cfg.max_num_seqs))
    out_conn.send(
        m.ReadyMsg(
            name=cfg.name,
            pid=os.getpid(),
            uss_before_weights=uss_before,
            uss_after_weights=uss_after,
            heap_reserved=reserved,
            num_params_shared=sum(p.is_shared() for p in params),
            num_params=len(params),
            mps_env={k: v for k, v in os.environ.items() if k.startswith("CUDA_MPS_")},
        )
    )
    # NOTE: imported here: the loops import this module's helpers
    from splitwiser.roles.colocated import ColocatedWorker
    from splitwiser.roles.prompt import PromptWorker
    from splitwiser.roles.token import TokenWorker

    if cfg.role == "prompt":
        PromptWorker(cfg, runner, kv_pool, in_conn, out_conn, device).run()
    elif cfg.role == "token":
        TokenWorker(cfg, runner, kv_pool, in_conn, out_conn, device, batch).run()
    else:
        ColocatedWorker(cfg, runner, kv_pool, in_conn, out_conn, device, batch).run()
    # on CUDA: hand the parent's storages back now (their IPC reference counts), not at
    # interpreter teardown
    settle(device)
    del runner, model, kv_pool, params, batch


def _decode_batch(cfg: WorkerConfig, kv_pool: torch.Tensor, device) -> DecodeBatch:
    # the pool's last block is the scratch block no request owns (see kv_pool.allocate_pool)
    scratch = kv_pool.shape[2] // cfg.block_size - 1
    max_blocks = -(-cfg.max_model_len // cfg.block_size)
    return DecodeBatch(cfg.max_num_seqs, max_blocks, scratch, device)
