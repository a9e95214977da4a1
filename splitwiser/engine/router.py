"""The request table and the routing between phases, on the engine thread: prefill results
become handoffs, decode steps become tokens for the caller, a lost worker's requests run again.
No processes here: what to send goes through the supervisor's workers."""

from __future__ import annotations

import time
from collections import deque

from splitwiser.config import EngineConfig
from splitwiser.engine import messages as m
from splitwiser.engine.handle import RequestHandle
from splitwiser.engine.procs import WorkerProc
from splitwiser.engine.request import Request, RequestStatus
from splitwiser.engine.scheduler import Scheduler
from splitwiser.engine.supervisor import Supervisor
from splitwiser.errors import SplitwiserError, WorkerCrashedError
from splitwiser.outputs import RequestOutput
from splitwiser.prompts import PromptChecker, stop_reason

PHASE_COUNTERS = (
    "prefill_batches", "prefill_tokens", "prefill_s", "decode_steps", "decode_tokens", "decode_s",
)  # fmt: skip


class Router:
    def __init__(
        self,
        config: EngineConfig,
        scheduler: Scheduler,
        supervisor: Supervisor,
        checker: PromptChecker,
        eos_token_ids: tuple[int, ...],
    ):
        self.config = config
        self.scheduler = scheduler
        self.supervisor = supervisor
        self.checker = checker
        self.eos_token_ids = eos_token_ids
        self.requests: dict[int, Request] = {}
        self.handles: dict[int, RequestHandle] = {}
        self.handoff_backlog: deque[m.HandoffMsg] = deque()  # no token worker ready yet
        # what each phase did, as the workers measured it: prefill batches, decode steps
        self.phase_counters = dict.fromkeys(PHASE_COUNTERS, 0.0)
        self.num_retried = 0  # requests run again after the worker running them died or hung

    def add(self, req: Request, handle: RequestHandle) -> None:
        self.requests[req.request_id] = req
        self.handles[req.request_id] = handle
        self.scheduler.add(req)

    def on_message(self, worker: WorkerProc, msg) -> None:
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
                self.fail(req, SplitwiserError(f"{worker.name}: {msg.error}"))
        elif isinstance(msg, m.ReadyMsg):
            worker.ready = msg

    def _on_prefill_done(self, msg: m.PrefillDoneMsg) -> None:
        now = time.monotonic()
        for i, rid in enumerate(msg.request_ids):
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.PREFILLING:
                continue  # cancelled meanwhile
            req.status = RequestStatus.DECODING
            req.prompt_worker = None
            if req.cancelled:
                self.finish(req, "abort", now)
                continue
            if not req.is_resumed:
                self._append_token(req, msg.first_tokens[i], now)
                if req.status is RequestStatus.FINISHED:
                    continue
            # NOTE: a resumed request drops the token the prompt worker sampled: its last
            # generated token, not yet cached, is the next input, as after a first prefill
            kv = msg.kv_copies[i] if msg.kv_copies is not None else None
            if kv is not None:
                req.metrics.kv_bytes_copied += kv.nbytes
            handoff = m.HandoffMsg(
                req.spec(), req.block_ids, req.num_prefill_tokens, req.output_token_ids[-1],
                msg.published_at, kv,
            )  # fmt: skip
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
            self.finish(req, reason, now, text)

    def finish(self, req: Request, reason: str, now: float, text: str | None = None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.metrics.finish_time = now
        req.text = text if text is not None else self.checker.decode(req.output_token_ids)
        if req.owned_by_worker:  # the token worker still runs it: free its blocks once it lets go
            self.supervisor.workers[("token", req.token_worker)].send(m.AbortMsg([req.request_id]))
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

    def fail(self, req: Request, error: SplitwiserError) -> None:
        if req.request_id in self.handles:
            self.handles[req.request_id]._fail(error)
        req.status = RequestStatus.FINISHED
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
        self.scheduler.free(req)
        self.requests.pop(req.request_id, None)
        self.handles.pop(req.request_id, None)

    def abort(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is None or req.status is RequestStatus.FINISHED:
            return
        if req.status is RequestStatus.WAITING:
            self.scheduler.waiting.remove(req)
        if req.status is RequestStatus.PREFILLING:
            req.cancelled = True  # finished when its prefill returns
            return
        self.finish(req, "abort", time.monotonic())

    def dispatch(self) -> None:
        # handoffs first: their K/V already occupy blocks
        tokens = self.supervisor.ready("token")
        while self.handoff_backlog and tokens:
            handoff = self.handoff_backlog.popleft()
            req = self.requests.get(handoff.request.request_id)
            if req is None or req.status is not RequestStatus.DECODING:
                continue
            index = self.scheduler.pick_token_worker({i: w.load for i, w in tokens.items()})
            req.token_worker = index
            req.owned_by_worker = True
            tokens[index].assign()
            tokens[index].send(handoff)
        prompts = self.supervisor.ready("prompt")
        loads = {i: w.load for i, w in prompts.items()}
        for index, batch in self.scheduler.schedule(loads):
            prompts[index].assign()
            now = time.monotonic()
            for req in batch:
                req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or now
            prompts[index].send(
                m.PrefillMsg(
                    requests=[r.spec() for r in batch],
                    token_ids=[r.prefill_token_ids for r in batch],
                    block_ids=[r.block_ids for r in batch],
                )
            )

    # ------------------------------------------------------------------ failures

    def on_worker_lost(self, worker: WorkerProc, reason: str) -> None:
        """A worker died, hung or never got ready (it is dead now): run its requests again."""
        role, index = worker.cfg.role, worker.cfg.index
        orphans = []
        for req in list(self.requests.values()):
            if role == "prompt" and req.status is RequestStatus.PREFILLING:
                if req.prompt_worker == index:
                    orphans.append(req)
            elif role == "token" and req.token_worker == index and req.owned_by_worker:
                req.owned_by_worker = False
                if req.status is RequestStatus.FINISHED:  # only its abort was outstanding
                    self._release(req)
                else:
                    orphans.append(req)
        self._retry(sorted(orphans, key=lambda r: r.request_id), f"{worker.name} {reason}")

    def fail_all(self, error: SplitwiserError) -> None:
        for req in list(self.requests.values()):
            self.fail(req, error)
        self.handoff_backlog.clear()

    def _retry(self, reqs: list[Request], what: str) -> None:
        """Prefill again (a resumed request: prompt and output so far) and go on decoding on a
        live worker; the caller sees the same tokens, none twice. A request lost more than
        ``max_request_retries`` times in a row without a new token fails."""
        again = []
        for req in reqs:
            if req.num_output_tokens > req.num_output_at_retry:
                req.num_retries = 0  # it progressed since it was last run again
            if req.num_retries >= self.config.max_request_retries:
                self.fail(
                    req,
                    WorkerCrashedError(
                        f"{what} while running this request, which was already run again "
                        f"{req.num_retries} times in a row without a new token "
                        f"(max_request_retries)"
                    ),
                )
                continue
            req.num_retries += 1
            req.num_output_at_retry = req.num_output_tokens
            again.append(req)
        self.num_retried += len(again)
        self.scheduler.requeue_front(again)
