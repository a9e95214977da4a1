"""The parent process: loads the model once, owns the pool, the allocator and the request table,
spawns the workers and routes every message between them on one engine thread."""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Pipe, wait

import torch

from splitwiser.config import (
    EngineConfig,
    resolve_device,
    resolve_dtype,
)
from splitwiser.engine.block_manager import BlockAllocator
from splitwiser.engine.handle import RequestHandle
from splitwiser.engine.kv_pool import KVLayout, allocate_pool, default_num_blocks
from splitwiser.engine.procs import WorkerProc, wait_ready
from splitwiser.engine.request import Request
from splitwiser.engine.router import Router
from splitwiser.engine.scheduler import Scheduler
from splitwiser.engine.supervisor import LostWorker, Supervisor
from splitwiser.engine.worker import WorkerConfig
from splitwiser.errors import (
    ConfigError,
    KVCacheTooSmallError,
    PipelineClosedError,
    SplitwiserError,
    WorkerCrashedError,
)
from splitwiser.models.loader import load_model
from splitwiser.models.registry import attention_window, resolve_model_impl
from splitwiser.outputs import RequestMetrics
from splitwiser.prompts import PromptChecker, eos_token_ids

log = logging.getLogger("splitwiser")


def phase_summary(counters: dict) -> dict:
    """Per-phase rates from the counters of ``stats()["phases"]`` (or a difference of two)."""
    c = counters
    return {
        **c,
        "prefill_tokens_per_s": c["prefill_tokens"] / c["prefill_s"] if c["prefill_s"] else None,
        "mean_prefill_batch_tokens": c["prefill_tokens"] / c["prefill_batches"]
        if c["prefill_batches"] else None,
        "mean_decode_step_ms": 1e3 * c["decode_s"] / c["decode_steps"]
        if c["decode_steps"] else None,
        "mean_decode_batch": c["decode_tokens"] / c["decode_steps"] if c["decode_steps"] else None,
    }  # fmt: skip


def cuda_context_active() -> bool:
    """Whether anything in this process already holds a CUDA context (torch, or any other
    library: ``torch.cuda.is_initialized()`` knows only torch's own). A process that never
    loaded the driver library has none; otherwise the driver says whether a primary context is
    active or one is current."""
    try:
        with open("/proc/self/maps") as f:
            if "libcuda.so" not in f.read():
                return False
        cuda = ctypes.CDLL("libcuda.so.1")
        if cuda.cuInit(0) != 0:
            return False
        current = ctypes.c_void_p()
        if cuda.cuCtxGetCurrent(ctypes.byref(current)) == 0 and current.value:
            return True
        count = ctypes.c_int()
        cuda.cuDeviceGetCount(ctypes.byref(count))
        for i in range(count.value):
            dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
            cuda.cuDeviceGet(ctypes.byref(dev), i)
            cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
            if active.value:
                return True
        return False
    except OSError:  # no /proc or no driver library: fall back to torch's own view
        return torch.cuda.is_initialized()


def _join_mps(pipe_dir: str) -> None:
    """This process allocates the weights and the pool that the workers map over CUDA IPC: it
    joins the workers' MPS daemon, which CUDA reads when it initialises. The variable stays set
    for the life of the process, as CUDA's connection does."""
    if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") == pipe_dir:
        return
    if cuda_context_active():
        raise ConfigError(
            "CUDA was initialised in this process before MPS was configured; create the pipeline "
            "with mps_pipe_dir before any CUDA work, or set CUDA_MPS_PIPE_DIRECTORY at start-up"
        )
    os.environ["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir


# pipelines not closed yet: closed at interpreter exit, before multiprocessing's own exit
# handler terminates their workers (which the engine thread would otherwise see die and restart)
_OPEN_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_at_exit_registered = False


def _close_open_engines() -> None:
    for engine in list(_OPEN_ENGINES):
        engine.close()


def _register_at_exit() -> None:
    # NOTE: registered when the first engine starts, after multiprocessing.util registered its
    # exit handler: atexit runs handlers last-in first-out, so this one runs before it
    global _at_exit_registered
    if not _at_exit_registered:
        atexit.register(_close_open_engines)
        _at_exit_registered = True


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.mps_pipe_dir is not None and str(config.device) != "cpu":
            _join_mps(config.mps_pipe_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        loaded = load_model(config.model, dtype=self.dtype, device=self.device)
        self.model, self.tokenizer, self.model_name = loaded.model, loaded.tokenizer, loaded.name
        if self.device.type == "cpu":
            self.model.share_memory()  # one copy of the weights, mapped by every worker
        self.eos_token_ids = eos_token_ids(self.model)
        model_len = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        window = attention_window(self.model.config)
        if window is not None:  # every token attends to every earlier one up to the window
            self.max_model_len = min(self.max_model_len, window)
        # which front-end the workers run: own model code or the Hugging Face modules
        self.model_impl = resolve_model_impl(self.model.config, config.model_impl)
        self.checker = PromptChecker(
            self.tokenizer, self.model.config.vocab_size, self.max_model_len
        )

        self.layout = KVLayout.from_model_config(self.model.config, config.block_size, self.dtype)
        self.num_kv_blocks = config.num_kv_blocks or default_num_blocks(
            self.layout, self.device, config, self.max_model_len, self.model.config
        )
        self.kv_pool = allocate_pool(self.layout, self.num_kv_blocks, self.device)
        self.allocator = BlockAllocator(self.num_kv_blocks)
        self.scheduler = Scheduler(self.allocator, config.block_size, config.max_prefill_tokens)

        self._incoming: deque = deque()  # (request, handle) or ("abort", id), from caller threads
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._wake_r, self._wake_w = Pipe(duplex=False)
        self._stopping = False
        self._closed = False
        self._fatal: SplitwiserError | None = None
        # NOTE: the engine thread holds this lock while it changes anything (it releases it only
        # to wait), so callers on other threads (stats, workers, submit) see a consistent state
        self._lock = threading.Lock()
        self.supervisor = Supervisor(config, self._spawn)
        self.router = Router(
            config, self.scheduler, self.supervisor, self.checker, self.eos_token_ids
        )
        try:
            self.supervisor.start_all()
            wait_ready(list(self.workers.values()), config.worker_start_timeout_s)
        except BaseException:
            self._stop_workers()
            self._release_memory()
            raise
        _register_at_exit()
        _OPEN_ENGINES.add(self)
        self._thread = threading.Thread(target=self._loop, name="splitwiser-engine", daemon=True)
        self._thread.start()

    @property
    def workers(self) -> dict[tuple[str, int], WorkerProc]:
        return self.supervisor.workers

    # ------------------------------------------------------------------ set-up

    def _spawn(self, role: str, index: int) -> WorkerProc:
        cfg = WorkerConfig(
            role=role,
            index=index,
            device=str(self.device),
            block_size=self.config.block_size,
            kv_handoff=self.config.kv_handoff,
            num_threads=self.config.threads_per_worker(),
            max_num_seqs=self.config.max_num_seqs,
            eos_token_ids=self.eos_token_ids,
            env=tuple(self.config.worker_env(role).items()),
            nvtx=self.config.nvtx_ranges,
            model_impl=self.model_impl,
            max_model_len=self.max_model_len,
            enforce_eager=self.config.enforce_eager,
            nice=self.config.worker_nice(role, self.device),
            max_prefill_tokens=self.config.max_prefill_tokens,
        )
        return WorkerProc(cfg, self.model, self.kv_pool)

    # ------------------------------------------------------------------ caller side

    def submit(self, prompt, params) -> RequestHandle:
        """Validate and queue a request; returns at once. Raises ``InvalidRequestError``."""
        if self._closed:
            raise PipelineClosedError("the pipeline is closed; create a new one")
        if self._fatal is not None:
            raise self._fatal
        token_ids = self.checker.token_ids(prompt)
        max_new = self.checker.max_new_tokens(len(token_ids), params)
        with self._id_lock:
            request_id = self._next_id
            self._next_id += 1
        req = Request(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=token_ids,
            params=params,
            seed=params.seed if params.seed is not None else random.getrandbits(62),
            max_new_tokens=max_new,
            metrics=RequestMetrics(arrival_time=time.monotonic()),
        )
        needed = req.num_blocks_needed(self.config.block_size)
        if needed > self.num_kv_blocks:
            raise KVCacheTooSmallError(
                f"request needs {needed} KV blocks ({len(token_ids)} prompt + {max_new} new tokens "
                f"at block_size {self.config.block_size}) but the pool has only "
                f"{self.num_kv_blocks}; "
                f"raise num_kv_blocks / kv_cache_bytes or lower max_new_tokens"
            )
        handle = RequestHandle(request_id, cancel=self._request_abort)
        with self._lock:
            if self._closed:
                raise PipelineClosedError("the pipeline is closed; create a new one")
            self._incoming.append((req, handle))
            self._wake_w.send_bytes(b"r")
        return handle

    def _request_abort(self, request_id: int) -> None:
        with self._lock:
            if not self._closed:
                self._incoming.append(("abort", request_id))
                self._wake_w.send_bytes(b"a")

    def stats(self) -> dict:
        """A consistent snapshot, from any thread. ``health`` is "ok" (every worker ready),
        "degraded" (some restarting, or waiting for the restart rate), "failed" (a role stopped:
        the pipeline accepts nothing more) or "closed"."""
        with self._lock:
            workers = self.supervisor.health()
            if self._closed:
                health = "closed"
            elif self._fatal is not None:
                health = "failed"
            elif all(w["ready"] == w["configured"] for w in workers.values()):
                health = "ok"
            else:
                health = "degraded"
            return {
                "num_kv_blocks": self.num_kv_blocks,
                "num_free_blocks": self.allocator.num_free,
                # counted from submit(), before the engine thread has taken the request
                "num_unfinished": len(self.router.requests)
                + sum(1 for item in self._incoming if item[0] != "abort"),
                "restarts": {role: w["restarts"] for role, w in workers.items()},
                "model_impl": self.model_impl,
                "num_retried": self.router.num_retried,
                "health": health,
                "error": None if self._fatal is None else str(self._fatal),
                "workers": workers,
                "phases": dict(self.router.phase_counters),
            }

    def worker_info(self) -> dict[str, dict]:
        """Ready workers: name -> the fields of their ready message (a copy, from any thread)."""
        with self._lock:
            return {w.name: dict(vars(w.ready)) for w in self.workers.values() if w.ready}

    def close(self) -> None:
        """Stop the engine thread, fail what is unfinished, stop every worker, and release the
        pool and the weights this process holds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            _OPEN_ENGINES.discard(self)
            try:
                self._wake_w.send_bytes(b"x")
            except OSError:
                pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            closed = PipelineClosedError("the pipeline was closed before the request finished")
            for handle in self.router.handles.values():
                handle._fail(closed)
            for _, handle in [x for x in self._incoming if x[0] != "abort"]:
                handle._fail(closed)
            self._incoming.clear()
            self._stop_workers()
            self._wake_r.close()
            self._wake_w.close()
            # blocks are not freed one by one: the pool itself goes
            self.router.requests.clear()
            self.router.handles.clear()
            self.router.handoff_backlog.clear()
            self._release_memory()

    def _stop_workers(self) -> None:
        self.supervisor.stop_all(self.config.worker_stop_timeout_s)

    def _release_memory(self) -> None:
        # the weights and the pool go once no worker holds them: drop this process's own
        # references (on CPU, shared memory stays mapped while one is left), then on CUDA let
        # torch free what the (now dead) workers had mapped
        self.model = self.kv_pool = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # never leave a caller waiting on a dead engine thread
            log.exception("engine thread failed")
            with self._lock:
                self._fatal = SplitwiserError(f"the engine thread failed: {exc!r}")
                for handle in self.router.handles.values():  # the handles alone: state is suspect
                    handle._fail(self._fatal)
                while self._incoming:
                    item = self._incoming.popleft()
                    if item[0] != "abort":
                        item[1]._fail(self._fatal)

    def _run(self) -> None:
        while not self._stopping:
            # 1) wait for a message, a new request, or a worker's death (the timeout bounds
            # how late a hung worker is noticed)
            by_conn = {w.conn: w for w in self.workers.values()}
            by_sentinel = {w.process.sentinel: w for w in self.workers.values()}
            ready = wait([self._wake_r, *by_conn, *by_sentinel], timeout=1.0)
            with self._lock:
                if self._stopping:
                    return
                if self._wake_r in ready:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                self._take_incoming()
                # 2) route worker messages
                for obj in ready:
                    if obj in by_conn:
                        self._drain(by_conn[obj])
                # 3) lost workers: dead (also those whose death raced the wait above), hung
                # with work outstanding, or never ready; their slots refill within the rate
                for lost in self.supervisor.find_lost():
                    self._on_worker_lost(lost)
                if not sys.is_finalizing():
                    self.supervisor.refill()
                # 4) schedule prefill batches and pending handoffs
                self.router.dispatch()

    def _take_incoming(self) -> None:
        while self._incoming:
            item = self._incoming.popleft()
            if item[0] == "abort":
                self.router.abort(item[1])
                continue
            req, handle = item
            if self._fatal is not None:
                handle._fail(self._fatal)
                continue
            self.router.add(req, handle)

    def _drain(self, worker: WorkerProc) -> None:
        try:
            while worker.conn.poll():
                msg = worker.conn.recv()
                worker.heard()
                self.router.on_message(worker, msg)
        except (EOFError, OSError):
            pass  # the worker died; its sentinel tells the rest

    def _on_worker_lost(self, lost: LostWorker) -> None:
        """A worker died, hung or never got ready (it is dead now): its requests run again on a
        live worker, and it is replaced as far as the restart rate allows."""
        worker = lost.worker
        self._drain(worker)  # what it published before dying still counts
        log.warning("%s %s", worker.name, lost.reason)
        self.supervisor.remove(worker)
        self.router.on_worker_lost(worker, lost.reason)
        if self._stopping or sys.is_finalizing():
            return  # closing: nothing to replace it for
        self.supervisor.replace(worker.cfg.role, worker.cfg.index)
        stopped = self.supervisor.stopped_role()
        if stopped is not None and self._fatal is None:
            c = self.config
            self._fatal = WorkerCrashedError(
                f"every {stopped} worker is lost and the restart rate "
                f"({c.max_worker_restarts} per {c.worker_restart_window_s:.0f} s) is spent: "
                f"they crash in a loop ({worker.name} {lost.reason}); create a new pipeline"
            )
            self.router.fail_all(self._fatal)
