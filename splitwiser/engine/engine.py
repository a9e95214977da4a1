"""The parent process: loads the model once, owns the pool, the allocator and the request table,
spawns the workers and routes every message between them on one engine thread."""

from __future__ import annotations

import gc
import logging
import os
import random
import threading
import time
from collections import deque
from multiprocessing.connection import Pipe, wait

import torch

from splitwiser.config import (
    EngineConfig,
    resolve_device,
    resolve_dtype,
)
from splitwiser.engine import messages as m
from splitwiser.engine.block_manager import BlockAllocator
from splitwiser.engine.handle import RequestHandle
from splitwiser.engine.kv_pool import KVLayout, allocate_pool, default_num_blocks
from splitwiser.engine.procs import WorkerProc, wait_ready
from splitwiser.engine.request import Request, RequestStatus
from splitwiser.engine.scheduler import Scheduler
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
from splitwiser.outputs import RequestMetrics, RequestOutput
from splitwiser.prompts import PromptChecker, eos_token_ids, stop_reason

log = logging.getLogger("splitwiser")


PHASE_COUNTERS = (
    "prefill_batches", "prefill_tokens", "prefill_s", "decode_steps", "decode_tokens", "decode_s",
)  # fmt: skip


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


def _join_mps(pipe_dir: str) -> None:
    """This process allocates the weights and the pool that the workers map over CUDA IPC: it
    joins the workers' MPS daemon, which CUDA reads when it initialises. The variable stays set
    for the life of the process, as CUDA's connection does."""
    if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") == pipe_dir:
        return
    if torch.cuda.is_initialized():
        raise ConfigError(
            "CUDA was initialised in this process before MPS was configured; create the pipeline "
            "with mps_pipe_dir before any CUDA work, or set CUDA_MPS_PIPE_DIRECTORY at start-up"
        )
    os.environ["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir


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

        self.requests: dict[int, Request] = {}
        self.handles: dict[int, RequestHandle] = {}
        self.handoff_backlog: deque[m.HandoffMsg] = deque()  # no token worker ready yet
        self._incoming: deque = deque()  # (request, handle) or ("abort", id), from caller threads
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._wake_r, self._wake_w = Pipe(duplex=False)
        self._stopping = False
        self._closed = False
        self._fatal: SplitwiserError | None = None
        self.restarts = {"prompt": 0, "token": 0}
        # what each phase did, as the workers measured it: prefill batches, decode steps
        self.phase_counters = dict.fromkeys(PHASE_COUNTERS, 0.0)
        self.num_retried = 0  # requests prefilled again after their prompt worker died
        self.workers: dict[tuple[str, int], WorkerProc] = {}
        try:
            for role, n in (
                ("prompt", config.num_prompt_workers),
                ("token", config.num_token_workers),
            ):
                for i in range(n):
                    self._spawn(role, i)
            wait_ready(list(self.workers.values()), config.worker_start_timeout_s)
        except BaseException:
            self._stop_workers()
            raise
        self._thread = threading.Thread(target=self._loop, name="splitwiser-engine", daemon=True)
        self._thread.start()

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
        )
        worker = WorkerProc(cfg, self.model, self.kv_pool)
        self.workers[(role, index)] = worker
        return worker

    def _ready(self, role: str) -> dict[int, WorkerProc]:
        return {i: w for (r, i), w in self.workers.items() if r == role and w.ready is not None}

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
        self._incoming.append((req, handle))
        self._wake_w.send_bytes(b"r")
        return handle

    def _request_abort(self, request_id: int) -> None:
        self._incoming.append(("abort", request_id))
        self._wake_w.send_bytes(b"a")

    def stats(self) -> dict:
        return {
            "num_kv_blocks": self.num_kv_blocks,
            "num_free_blocks": self.allocator.num_free,
            "num_unfinished": len(self.requests),
            "restarts": dict(self.restarts),
            "model_impl": self.model_impl,
            "num_retried": self.num_retried,
            "phases": dict(self.phase_counters),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        try:
            self._wake_w.send_bytes(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join()
        closed = PipelineClosedError("the pipeline was closed before the request finished")
        for req_id in list(self.requests):
            self.handles[req_id]._fail(closed)
        for _, handle in [x for x in self._incoming if x[0] != "abort"]:
            handle._fail(closed)
        self._stop_workers()
        self._wake_r.close()
        self._wake_w.close()
        self.handoff_backlog.clear()
        if self.device.type == "cuda":
            # the weights and the pool go once no worker holds them: drop this process's own
            # references, then let torch free what the (now dead) workers had mapped
            self.model = self.kv_pool = None
            gc.collect()
            torch.cuda.ipc_collect()

    def _stop_workers(self) -> None:
        for worker in self.workers.values():
            worker.stop(self.config.worker_stop_timeout_s)
        self.workers.clear()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # never leave a caller waiting on a dead engine thread
            log.exception("engine thread failed")
            self._fatal = SplitwiserError(f"the engine thread failed: {exc!r}")
            for req in list(self.requests.values()):
                self._fail(req, self._fatal)
            while self._incoming:
                item = self._incoming.popleft()
                if item[0] != "abort":
                    item[1]._fail(self._fatal)

    def _run(self) -> None:
        while not self._stopping:
            # 1) wait for a message, a new request, or a worker's death
            by_conn = {w.conn: w for w in self.workers.values()}
            by_sentinel = {w.process.sentinel: w for w in self.workers.values()}
            ready = wait([self._wake_r, *by_conn, *by_sentinel], timeout=1.0)
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
            self._take_incoming()
            # 2) route worker messages
            for obj in ready:
                if obj in by_conn:
                    self._drain(by_conn[obj])
            # 3) notice dead workers (also those whose death raced the wait above), and a
            # restarted worker that never became ready: stopped, then handled as dead
            for worker in list(self.workers.values()):
                if worker.ready is None and worker.age_s() > self.config.worker_start_timeout_s:
                    log.warning("%s not ready after %.0f s", worker.name, worker.age_s())
                    worker.process.kill()
                    worker.process.join()
                if not worker.is_alive():
                    self._on_worker_died(worker)
            # 4) schedule prefill batches and pending handoffs
            self._dispatch()

    def _take_incoming(self) -> None:
        while self._incoming:
            item = self._incoming.popleft()
            if item[0] == "abort":
                self._abort(item[1])
                continue
            req, handle = item
            if self._fatal is not None:
                handle._fail(self._fatal)
                continue
            self.requests[req.request_id] = req
            self.handles[req.request_id] = handle
            self.scheduler.add(req)

    def _drain(self, worker: WorkerProc) -> None:
        try:
            while worker.conn.poll():
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass  # the worker died; its sentinel tells the rest

    def _handle(self, worker: WorkerProc, msg) -> None:
        if isinstance(msg, m.PrefillDoneMsg):
            worker.load -= 1
            c = self.phase_counters
            c["prefill_batches"] += 1
            c["prefill_tokens"] += msg.batch_tokens
            c["prefill_s"] += msg.compute_s
            self._on_prefill_done(msg)
        elif isinstance(msg, m.TokensMsg):
            if msg.request_ids:  # a decode step (an abort acknowledgement carries none)
                c = self.phase_counters
                c["decode_steps"] += 1
                c["decode_tokens"] += len(msg.request_ids)
                c["decode_s"] += msg.step_s
            self._on_tokens(worker, msg)
        elif isinstance(msg, m.WorkerErrorMsg):
            if worker.cfg.role == "prompt":
                worker.load -= 1
            for rid in msg.request_ids:
                req = self.requests.get(rid)
                if req is None:
                    continue
                if req.owned_by_worker:  # the token worker dropped it with the failed step
                    req.owned_by_worker = False
                    worker.load -= 1
                self._fail(req, SplitwiserError(f"{worker.name}: {msg.error}"))
        elif isinstance(msg, m.ReadyMsg):
            worker.ready = msg

    def _on_prefill_done(self, msg: m.PrefillDoneMsg) -> None:
        now = time.monotonic()
        for i, rid in enumerate(msg.request_ids):
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.PREFILLING:
                continue  # cancelled meanwhile
            token = msg.first_tokens[i]
            req.status = RequestStatus.DECODING
            req.prompt_worker = None
            if req.cancelled:
                self._finish(req, "abort", now)
                continue
            self._append_token(req, token, now)
            if req.status is RequestStatus.FINISHED:
                continue
            kv = msg.kv_copies[i] if msg.kv_copies is not None else None
            if kv is not None:
                req.metrics.kv_bytes_copied = kv.nbytes
            spec = m.RequestSpec(req.request_id, req.params, req.seed, req.max_new_tokens)
            handoff = m.HandoffMsg(
                spec, req.block_ids, req.num_prompt_tokens, token, msg.published_at, kv
            )
            self.handoff_backlog.append(handoff)

    def _on_tokens(self, worker: WorkerProc, msg: m.TokensMsg) -> None:
        now = time.monotonic()
        for rid, handoff_s in msg.handoff_s.items():
            if rid in self.requests:
                self.requests[rid].metrics.handoff_s = handoff_s
        for rid, token, done in zip(msg.request_ids, msg.tokens, msg.finished):
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.DECODING:
                continue  # a stop string already ended it; the abort is on its way
            if done:
                req.owned_by_worker = False
                worker.load -= 1
            self._append_token(req, token, now)
        for rid in msg.released:
            req = self.requests.get(rid)
            if req is not None and req.owned_by_worker:
                req.owned_by_worker = False
                worker.load -= 1
                self._release(req)

    def _append_token(self, req: Request, token: int, now: float) -> None:
        req.output_token_ids.append(token)
        req.metrics.token_times.append(now)
        self.handles[req.request_id]._push(token)
        reason = stop_reason(
            token, req.num_output_tokens, req.max_new_tokens, req.params, self.eos_token_ids
        )
        text = None
        if reason is None and req.params.stop:
            text, matched = self.checker.apply_stop_strings(req.output_token_ids, req.params.stop)
            reason = "stop" if matched else None
        if reason is not None:
            self._finish(req, reason, now, text)

    def _finish(self, req: Request, reason: str, now: float, text: str | None = None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.metrics.finish_time = now
        req.text = text if text is not None else self.checker.decode(req.output_token_ids)
        if req.owned_by_worker:  # the token worker still runs it: free its blocks once it lets go
            self.workers[("token", req.token_worker)].send(m.AbortMsg([req.request_id]))
        else:
            self._release(req)

    def _release(self, req: Request) -> None:
        """Free the blocks, then resolve the handle: so after generate(), all blocks are free."""
        self.scheduler.free(req)
        self.requests.pop(req.request_id, None)
        handle = self.handles.pop(req.request_id)
        if req.finish_reason is None:
            return
        handle._finish(
            RequestOutput(
                request_id=req.request_id,
                prompt=req.prompt,
                prompt_token_ids=req.prompt_token_ids,
                token_ids=list(req.output_token_ids),
                text=req.text,
                finish_reason=req.finish_reason,
                metrics=req.metrics,
            )
        )

    def _fail(self, req: Request, error: SplitwiserError) -> None:
        self.handles[req.request_id]._fail(error)
        req.status = RequestStatus.FINISHED
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
        self.scheduler.free(req)
        self.requests.pop(req.request_id, None)
        self.handles.pop(req.request_id, None)

    def _abort(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is None or req.status is RequestStatus.FINISHED:
            return
        if req.status is RequestStatus.WAITING:
            self.scheduler.waiting.remove(req)
        if req.status is RequestStatus.PREFILLING:
            req.cancelled = True  # finished when its prefill returns
            return
        self._finish(req, "abort", time.monotonic())

    def _dispatch(self) -> None:
        # handoffs first: their K/V already occupy blocks
        tokens = self._ready("token")
        while self.handoff_backlog and tokens:
            handoff = self.handoff_backlog.popleft()
            req = self.requests.get(handoff.request.request_id)
            if req is None or req.status is not RequestStatus.DECODING:
                continue
            index = self.scheduler.pick_token_worker({i: w.load for i, w in tokens.items()})
            req.token_worker = index
            req.owned_by_worker = True
            tokens[index].load += 1
            tokens[index].send(handoff)
        prompts = self._ready("prompt")
        loads = {i: w.load for i, w in prompts.items()}
        for index, batch in self.scheduler.schedule(loads):
            prompts[index].load += 1
            now = time.monotonic()
            for req in batch:
                req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or now
            prompts[index].send(
                m.PrefillMsg(
                    requests=[
                        m.RequestSpec(r.request_id, r.params, r.seed, r.max_new_tokens)
                        for r in batch
                    ],
                    token_ids=[r.prompt_token_ids for r in batch],
                    block_ids=[r.block_ids for r in batch],
                )
            )

    # ------------------------------------------------------------------ failures

    def _on_worker_died(self, worker: WorkerProc) -> None:
        self._drain(worker)  # what it published before dying still counts
        role, index = worker.cfg.role, worker.cfg.index
        code = worker.process.exitcode
        log.warning("%s died (exit code %s)", worker.name, code)
        worker.stop(0.0)
        del self.workers[(role, index)]
        if role == "prompt":
            # prefill is deterministic and wrote nothing anyone read: run those prompts again
            orphans = [
                r
                for r in self.requests.values()
                if r.status is RequestStatus.PREFILLING and r.prompt_worker == index
            ]
            self.scheduler.requeue_front(sorted(orphans, key=lambda r: r.request_id))
            self.num_retried += len(orphans)
        else:
            error = WorkerCrashedError(
                f"{worker.name} died (exit code {code}) while decoding this request"
            )
            for req in list(self.requests.values()):
                if req.token_worker == index and req.owned_by_worker:
                    req.owned_by_worker = False
                    if req.status is RequestStatus.FINISHED:
                        self._release(req)
                    else:
                        self._fail(req, error)
        if self.restarts[role] < self.config.max_worker_restarts:
            self.restarts[role] += 1
            self._spawn(role, index)  # ready when its ReadyMsg arrives
        elif not any(r == role for r, _ in self.workers):
            self._fatal = WorkerCrashedError(
                f"every {role} worker died and the restart limit "
                f"({self.config.max_worker_restarts}) was reached; create a new pipeline"
            )
            for req in list(self.requests.values()):
                self._fail(req, self._fatal)
