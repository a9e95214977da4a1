"""What a worker loop runs with: its config, its channel from the parent, and the device
helpers every loop uses (NVTX ranges, synchronisation after a step)."""

from __future__ import annotations

import contextlib
import os
import queue
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from splitwiser.config import EngineConfig

if TYPE_CHECKING:
    from splitwiser.handoff import Handoff
    from splitwiser.worker.decode_batch import DecodeBatch
    from splitwiser.worker.model_runner import ModelRunner


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
    role: str = ""  # a name of splitwiser.roles.ROLES, set per worker
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


@dataclass
class WorkerParts:
    """What a role's worker loop is built from, once the worker started up."""

    cfg: WorkerConfig
    runner: ModelRunner
    kv_pool: torch.Tensor  # [layers, 2 (key, value), slots, kv_heads, head_dim], shared
    in_conn: object  # the parent's messages
    out_conn: object  # this worker's reports
    device: torch.device
    batch: DecodeBatch | None  # the persistent decode batch of a role that decodes
    handoff: Handoff  # how a prompt's K/V reach the token worker (splitwiser.handoff)
