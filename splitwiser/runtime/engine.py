"""The process side of the engine: loads the model once, allocates the pool, spawns and
supervises the workers, and runs the ``EngineCore`` on one engine thread, sending what it
returns. It holds no request state of its own: that is the core's."""

from __future__ import annotations

import atexit
import gc
import logging
import sys
import threading
import weakref
from collections import deque
from dataclasses import replace
from multiprocessing.connection import Pipe, wait

import torch

from splitwiser.config import EngineConfig, resolve_device, resolve_dtype
from splitwiser.core.engine_core import EngineCore, Send
from splitwiser.core.messages import ReadyMsg
from splitwiser.core.prompts import PromptChecker, eos_token_ids
from splitwiser.errors import PipelineClosedError, SplitwiserError, WorkerCrashedError
from splitwiser.handle import RequestHandle
from splitwiser.handoff import select_handoff
from splitwiser.kv.pool import KVLayout, allocate_pool, default_num_blocks
from splitwiser.models.loader import load_model
from splitwiser.models.registry import resolve_model_impl
from splitwiser.models.shape import ModelShape
from splitwiser.roles import make_roles
from splitwiser.runtime import spawn
from splitwiser.runtime.cuda_context import join_mps
from splitwiser.runtime.procs import WorkerProc, wait_ready
from splitwiser.runtime.supervisor import LostWorker, Supervisor
from splitwiser.worker.context import WorkerConfig

log = logging.getLogger("splitwiser")

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
        # a spawned child re-running a script that lacks the main guard: out before any work
        spawn.exit_if_bootstrapping()
        self.config = config
        if config.mps_pipe_dir is not None and str(config.device) != "cpu":
            join_mps(config.mps_pipe_dir)
        self.device = resolve_device(config.device)
        spawn.start_worker_server(self.device.type)  # its imports overlap the model's loading
        self.dtype = resolve_dtype(config.dtype, self.device)
        loaded = load_model(config.model, dtype=self.dtype, device=self.device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if self.device.type == "cpu":
            self.model.share_memory()  # one copy of the weights, mapped by every worker
        self.shape = ModelShape.from_hf(self.model.config)
        self.max_model_len = self.shape.max_model_len(config.max_model_len)
        # which front-end the workers run: own model code or the Hugging Face modules
        self.model_impl = resolve_model_impl(self.model.config, config.model_impl)
        eos = eos_token_ids(self.model)

        self.layout = KVLayout.from_shape(self.shape, config.block_size, self.dtype)
        self.num_kv_blocks = config.num_kv_blocks or default_num_blocks(
            self.layout, self.device, config, self.max_model_len, self.model.config
        )
        sized_by_default = config.num_kv_blocks is None and config.kv_cache_bytes is None
        if sized_by_default and config.max_model_len is None:
            # NOTE: a default pool smaller than the model's context (a CPU pool is capped) bounds
            # the context, so that a request asking for the rest of it (a chat client without
            # max_tokens) still fits the pool alone; explicit sizes keep KVCacheTooSmallError
            self.max_model_len = min(self.max_model_len, self.num_kv_blocks * config.block_size)
        checker = PromptChecker(self.tokenizer, self.shape.vocab_size, self.max_model_len)
        self.kv_pool = allocate_pool(self.layout, self.num_kv_blocks, self.device)
        handoff = select_handoff(config)  # the workers select the same one
        self.core = EngineCore(
            config, self.num_kv_blocks, checker, eos, make_roles(config),
            chunked_prefill=handoff.allows_chunked_prefill,
        )  # fmt: skip
        # one worker's config; every worker's is this one with its role and index replaced
        self._worker_cfg = WorkerConfig(
            engine=config,
            device=str(self.device),
            model_impl=self.model_impl,
            max_model_len=self.max_model_len,
            eos_token_ids=eos,
            max_num_batched_tokens=config.step_token_budget(self.device),
            nvtx=config.nvtx_ranges,
        )

        self._incoming: deque = deque()  # ("add", request) or ("abort", id), from caller threads
        self._wake_r, self._wake_w = Pipe(duplex=False)
        self._stopping = False
        self._closed = False
        self._fatal: SplitwiserError | None = None
        # NOTE: the engine thread holds this lock while it changes anything (it releases it only
        # to wait), so callers on other threads (stats, workers, submit) see a consistent state
        self._lock = threading.Lock()
        self.supervisor = Supervisor(config, self._spawn)
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

    def _spawn(self, role: str, index: int) -> WorkerProc:
        cfg = replace(self._worker_cfg, role=role, index=index)
        return WorkerProc(cfg, self.model, self.kv_pool)

    # ------------------------------------------------------------------ caller side

    def submit(self, prompt, params) -> RequestHandle:
        """Validate and queue a request; returns at once. Raises ``InvalidRequestError``."""
        if self._closed:
            raise PipelineClosedError("the pipeline is closed; create a new one")
        if self._fatal is not None:
            raise self._fatal
        req = self.core.new_request(prompt, params, cancel=self._request_abort)
        self._put(("add", req))
        return req.handle

    def _request_abort(self, request_id: int) -> None:
        try:
            self._put(("abort", request_id))
        except PipelineClosedError:
            pass  # closed: every request already ended

    def _put(self, item) -> None:
        with self._lock:
            if self._closed:
                raise PipelineClosedError("the pipeline is closed; create a new one")
            self._incoming.append(item)
            self._wake_w.send_bytes(b"w")

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
            core = self.core.snapshot()
            # counted from submit(), before the engine thread has taken the request
            core["num_unfinished"] += sum(1 for kind, _ in self._incoming if kind == "add")
            return {
                "num_kv_blocks": self.num_kv_blocks,
                "block_size": self.config.block_size,
                "kv_bytes_per_token": self.layout.bytes_per_token,
                "kv_bytes_per_block": self.layout.bytes_per_block,
                **core,
                "restarts": {role: w["restarts"] for role, w in workers.items()},
                "model_impl": self.model_impl,
                "max_model_len": self.max_model_len,
                "health": health,
                "error": None if self._fatal is None else str(self._fatal),
                "workers": workers,
            }

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, from any thread; False (nothing done) while a request
        holds blocks."""
        with self._lock:
            return not self._closed and self.core.reset_prefix_cache()

    def set_phase_slo(self, ttft_ms: float | None, tpot_ms: float | None) -> None:
        with self._lock:
            self.core.set_phase_slo(ttft_ms, tpot_ms)

    def phase_log(self, since_s: float = 0.0) -> list:
        """The prefill batches and decode steps that began at or after ``since_s``
        (``time.monotonic()``), as ``PhaseRecord``s, oldest first (at most the latest 65,536)."""
        with self._lock:
            return [r for r in self.core.phase_log if r.start_s >= since_s]

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
            self._take_incoming()  # requests not taken yet fail with the rest
            self.core.close(closed)  # blocks are not freed one by one: the pool itself goes
            self._stop_workers()
            self._wake_r.close()
            self._wake_w.close()
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
                self._take_incoming()
                self.core.close(self._fatal)  # the handles alone: the state is suspect

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
                for lost in self.supervisor.find_lost(self.core.busy_workers()):
                    self._on_worker_lost(lost)
                if not sys.is_finalizing():
                    self.supervisor.refill()
                # 4) schedule: handoffs to the token workers, prefill batches to the prompt ones
                idle = set(self.workers) - self.core.busy_workers()
                ready = {role: list(self.supervisor.ready(role)) for role in self.core.roles}
                self._send(self.core.schedule(ready), idle)

    def _send(self, sends: list[Send], idle: set | frozenset = frozenset()) -> None:
        for key, msg in sends:
            worker = self.workers.get(key)
            if worker is None:
                continue  # lost meanwhile: its requests were already run again
            if key in idle:
                worker.heard()  # work for an idle worker: its liveness clock starts now
            worker.send(msg)

    def _take_incoming(self) -> None:
        while self._incoming:
            kind, item = self._incoming.popleft()
            if kind == "abort":
                self._send(self.core.abort(item))
            elif self._fatal is not None or self._closed:
                item.handle._fail(self._fatal or PipelineClosedError("the pipeline is closed"))
            else:
                self.core.add_request(item)

    def _drain(self, worker: WorkerProc) -> None:
        key = (worker.cfg.role, worker.cfg.index)
        try:
            while worker.conn.poll():
                msg = worker.conn.recv()
                worker.heard()
                if isinstance(msg, ReadyMsg):  # a restarted worker: ready for work
                    worker.ready = msg
                elif self.workers.get(key) is worker:
                    self._send(self.core.on_message(key, msg))
        except (EOFError, OSError):
            pass  # the worker died; its sentinel tells the rest

    def _on_worker_lost(self, lost: LostWorker) -> None:
        """A worker died, hung or never got ready (it is dead now): its requests run again on a
        live worker, and it is replaced as far as the restart rate allows."""
        worker = lost.worker
        self._drain(worker)  # what it published before dying still counts
        log.warning("%s %s", worker.name, lost.reason)
        self.supervisor.remove(worker)
        self.core.on_worker_lost((worker.cfg.role, worker.cfg.index), lost.reason)
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
            self._send(self.core.fail_all(self._fatal))
