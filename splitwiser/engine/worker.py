"""The worker processes: a prompt worker runs batched prefill, a token worker runs continuous-batch
decode. Both map the parent's weights and KV pool (shared memory on CPU, CUDA IPC on GPU)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace
from multiprocessing.reduction import ForkingPickler

import psutil
import torch

from splitwiser.engine import messages as m
from splitwiser.engine.decode_batch import DecodeBatch
from splitwiser.engine.kv_pool import KVLayout, prefill_workspace_bytes, slots_for
from splitwiser.engine.model_runner import ModelRunner, PrefillSeq, graph_batch_sizes
from splitwiser.sampling import sample_next, sample_tokens


@dataclass(frozen=True)
class WorkerConfig:
    role: str  # "prompt" or "token"
    index: int
    device: str
    block_size: int
    kv_handoff: str  # "shared" or "copy"
    num_threads: int
    max_num_seqs: int  # token worker: running requests per decode step
    eos_token_ids: tuple[int, ...]
    env: tuple[tuple[str, str], ...] = ()  # set before CUDA starts (MPS pipe, thread share)
    nvtx: bool = False  # NVTX ranges per prefill batch / decode step (CUDA only)
    model_impl: str = "splitwiser"  # or "transformers" (see splitwiser.models.registry)
    max_model_len: int = 2048  # prompt + output tokens of one request
    enforce_eager: bool = False  # token worker on CUDA: no decode CUDA graphs
    nice: int = 0  # added to the process's niceness (EngineConfig.phase_priority)
    max_prefill_tokens: int = 4096  # prompt worker: tokens of its largest prefill batch

    @property
    def name(self) -> str:
        return f"splitwiser-{self.role}-{self.index}"


def _uss() -> int:
    return psutil.Process().memory_full_info().uss


def _get(in_conn, block: bool):
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _settle(device: torch.device) -> None:
    """After a failed step: let kernels already queued finish writing into the requests' blocks
    before the parent hands those blocks to someone else."""
    try:
        _synchronize(device)
    except Exception:  # a broken context: nothing more will run on it anyway
        pass


def keep_freed_memory() -> None:
    """Serve the step's large temporaries (gathered K/V, logits) from the heap instead of a
    fresh mmap each time: glibc's default returns them to the kernel on free, and faulting their
    pages in again every step doubled the CPU decode step (measured at batch 32, context 512)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def reserve_heap(num_bytes: int) -> None:
    """Fault ``num_bytes`` of heap in now, once, and keep it (``keep_freed_memory``): the first
    full prefill batch otherwise spends its time in page faults (measured: a third of a
    4,096-token batch's time on the embedded model), as every larger batch after it would."""
    buf = torch.empty(num_bytes, dtype=torch.uint8)
    buf.fill_(0)  # touches every page
    del buf


def worker_main(cfg: WorkerConfig, payload: bytes, in_conn, out_conn) -> None:
    """Entry point of a spawned worker. ``payload`` pickles (model, kv_pool) as shared handles."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops its workers.
    # SIGINT arrives blocked (see WorkerProc): ignore it, then unblock, dropping one pending
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # NOTE: before anything touches CUDA: the driver reads the MPS variables when it initialises
    os.environ.update(dict(cfg.env))
    try:
        with open("/proc/self/comm", "w") as f:  # visible in `ps`: sw-prompt-0, sw-token-1
            f.write(f"sw-{cfg.role}-{cfg.index}"[:15])
    except OSError:
        pass
    cfg = for_attached_profiler(cfg)
    keep_freed_memory()
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
    if cfg.role == "prompt" and device.type == "cpu":
        layout = KVLayout.from_model_config(model.config, cfg.block_size, params[0].dtype)
        reserved = prefill_workspace_bytes(model.config, layout, cfg.max_prefill_tokens)
        reserve_heap(reserved)
    batch = None
    if cfg.role == "token":
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
    if cfg.role == "prompt":
        PromptWorker(cfg, runner, kv_pool, in_conn, out_conn, device).run()
    else:
        TokenWorker(cfg, runner, kv_pool, in_conn, out_conn, device, batch).run()
    # on CUDA: hand the parent's storages back now (their IPC reference counts), not at
    # interpreter teardown
    _settle(device)
    del runner, model, kv_pool, params, batch


def _decode_batch(cfg: WorkerConfig, kv_pool: torch.Tensor, device) -> DecodeBatch:
    # the pool's last block is the scratch block no request owns (see kv_pool.allocate_pool)
    scratch = kv_pool.shape[2] // cfg.block_size - 1
    max_blocks = -(-cfg.max_model_len // cfg.block_size)
    return DecodeBatch(cfg.max_num_seqs, max_blocks, scratch, device)


class PromptWorker:
    def __init__(self, cfg, runner: ModelRunner, kv_pool, in_conn, out_conn, device):
        self.cfg, self.runner, self.kv_pool = cfg, runner, kv_pool
        self.in_conn, self.out_conn, self.device = in_conn, out_conn, device

    def run(self) -> None:
        while True:
            msg = _get(self.in_conn, block=True)  # 1) receive
            if isinstance(msg, m.ShutdownMsg):
                return
            try:
                self.out_conn.send(self.prefill(msg))
            except Exception:
                ids = [r.request_id for r in msg.requests]
                _settle(self.device)
                self.out_conn.send(m.WorkerErrorMsg(ids, traceback.format_exc(limit=4)))

    def prefill(self, msg: m.PrefillMsg) -> m.PrefillDoneMsg:
        t0 = time.monotonic()
        seqs = [PrefillSeq(t, b) for t, b in zip(msg.token_ids, msg.block_ids)]
        copy = self.cfg.kv_handoff == "copy"
        total = sum(len(t) for t in msg.token_ids)
        if copy:  # K/V go to a private staging buffer and then, through host memory, to the parent
            layers, _, _, kv_heads, head_dim = self.kv_pool.shape
            target = torch.empty(
                (layers, 2, total, kv_heads, head_dim), dtype=self.kv_pool.dtype, device=self.device
            )
        else:  # K/V go straight into the requests' blocks
            target = self.kv_pool
        with phase_range(self.cfg, self.device, f"prefill b={len(seqs)} t={total}"):
            logits = self.runner.prefill(seqs, target, contiguous_slots=copy)  # [B, vocab]
            first = sample_tokens(logits, [(r.params, r.seed, 0) for r in msg.requests])
        # NOTE: publish only after the prefill kernels finished: the token worker reads at once
        _synchronize(self.device)
        done = time.monotonic()  # the K/V are ready: the handoff starts here, in both modes
        kv_copies = None
        if copy:
            kv_copies, start = [], 0
            for t in msg.token_ids:
                kv = target[:, :, start : start + len(t)]
                start += len(t)
                nbytes = kv.numel() * kv.element_size()
                if self.device.type == "cuda":  # stays on the device; the IPC handle travels
                    kv_copies.append(m.KVCopy(nbytes, cuda_ipc=bytes(ForkingPickler.dumps(kv))))
                else:
                    kv_copies.append(m.KVCopy(nbytes, tensor=kv.clone()))
            # buffers of earlier batches whose token workers are done with them
            if self.device.type == "cuda":
                torch.cuda.ipc_collect()
        return m.PrefillDoneMsg(
            request_ids=[r.request_id for r in msg.requests],
            first_tokens=first,
            published_at=done,
            kv_copies=kv_copies,
            batch_tokens=total,
            compute_s=done - t0,
        )


@dataclass
class _RunningSeq:
    spec: m.RequestSpec
    num_generated: int


class TokenWorker:
    """Continuous batching over the persistent ``DecodeBatch``: ``self.rows[i]`` is the request
    in the batch's row ``i``."""

    def __init__(self, cfg, runner: ModelRunner, kv_pool, in_conn, out_conn, device, batch):
        self.cfg, self.runner, self.kv_pool = cfg, runner, kv_pool
        self.in_conn, self.out_conn, self.device = in_conn, out_conn, device
        self.batch: DecodeBatch = batch
        self.rows: list[_RunningSeq] = []
        self.pending: deque[m.HandoffMsg] = deque()
        self.eos = set(cfg.eos_token_ids)

    def run(self) -> None:
        while True:
            # 1) receive: block while idle, otherwise take what arrived since the last step
            if self._receive(block=not self.rows and not self.pending):
                return
            # 2) admit handed-off requests at the step boundary
            handoff_s = self._admit()
            if not self.rows:
                continue
            # 3) run one decode step, 4) publish its tokens
            try:
                self.out_conn.send(self._step(handoff_s))
            except Exception:
                ids = [s.spec.request_id for s in self.rows]
                self.rows.clear()
                self.batch.clear()
                _settle(self.device)
                self.out_conn.send(m.WorkerErrorMsg(ids, traceback.format_exc(limit=4)))

    def _receive(self, block: bool) -> bool:
        """Drain the incoming messages; True when asked to shut down."""
        while True:
            try:
                msg = _get(self.in_conn, block)
            except queue.Empty:
                return False
            block = False
            if isinstance(msg, m.ShutdownMsg):
                return True
            if isinstance(msg, m.HandoffMsg):
                self.pending.append(msg)
            elif isinstance(msg, m.AbortMsg):
                self._abort(msg.request_ids)

    def _remove(self, row: int) -> None:
        moved = self.batch.remove(row)
        last = self.rows.pop()
        if moved is not None:
            self.rows[row] = last

    def _abort(self, request_ids: list[int]) -> None:
        ids = set(request_ids)
        self.pending = deque(h for h in self.pending if h.request.request_id not in ids)
        for row in reversed(range(len(self.rows))):
            if self.rows[row].spec.request_id in ids:
                self._remove(row)
        # NOTE: acknowledged at once: this worker no longer touches their blocks
        self.out_conn.send(m.TokensMsg([], [], [], released=sorted(ids)))

    def _admit(self) -> dict[int, float]:
        handoff_s = {}
        while self.pending and len(self.rows) < self.cfg.max_num_seqs:
            h = self.pending.popleft()
            if h.kv_copy is not None:  # copy handoff: scatter the received K/V into the blocks
                slots = slots_for(h.block_ids, h.prompt_len, self.cfg.block_size, self.device)
                kv = h.kv_copy.open()  # CUDA: maps the prompt worker's buffer
                self.kv_pool[:, :, slots] = kv  # device to device on CUDA
                _synchronize(self.device)  # the handoff ends when the K/V are in place
                del kv  # CUDA: the prompt worker may free its buffer now
            self.batch.add(h.block_ids, h.prompt_len, h.first_token)
            self.rows.append(_RunningSeq(h.request, 1))
            handoff_s[h.request.request_id] = time.monotonic() - h.published_at
        return handoff_s

    def _step(self, handoff_s: dict[int, float]) -> m.TokensMsg:
        t0 = time.monotonic()
        seqs = list(self.rows)
        with phase_range(self.cfg, self.device, f"decode b={len(seqs)}"):
            logits = self.runner.decode(self.batch, self.kv_pool)  # [B, vocab]
            new = sample_next(logits, [(s.spec.params, s.spec.seed, s.num_generated) for s in seqs])
            self.batch.advance(new)
            tokens = new.tolist()  # the step's one host synchronisation
        finished = []
        for s, tok in zip(seqs, tokens):
            p = s.spec.params
            s.num_generated += 1
            done = s.num_generated >= s.spec.max_new_tokens or tok in p.stop_token_ids
            finished.append(done or (not p.ignore_eos and tok in self.eos))
        for row in reversed(range(len(seqs))):  # highest first: moves never touch a done row
            if finished[row]:
                self._remove(row)
        ids = [s.spec.request_id for s in seqs]
        return m.TokensMsg(ids, tokens, finished, [], handoff_s, time.monotonic() - t0)
