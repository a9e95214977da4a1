"""The engine core: the request table, the scheduler, the block allocator, the stop rule, the
routing between worker roles and what happens to the requests of a lost worker.

Driven by inputs (a new request, an abort, a worker's message, a worker's loss, a scheduling
tick) and answering with what to send to which worker: ``[(worker_key, msg)]``. No pipes, no
processes, no threads: ``Engine`` (engine.py) runs it on its thread and does the sending, and
tests drive it in one process with scripted worker messages.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitwiser.config import EngineConfig
from splitwiser.core import messages as m
from splitwiser.core.phase_control import SloPhaseController, ladder
from splitwiser.core.prompts import PromptChecker
from splitwiser.core.request import Request, RequestStatus, WorkerKey
from splitwiser.core.scheduler import Scheduler
from splitwiser.core.stop import StopStringMatcher, stop_reason
from splitwiser.errors import KVCacheTooSmallError, SplitwiserError, WorkerCrashedError
from splitwiser.handle import RequestHandle
from splitwiser.kv.block_pool import BlockPool
from splitwiser.outputs import RequestMetrics
from splitwiser.sampling import SamplingParams

if TYPE_CHECKING:
    from splitwiser.roles.base import Role

Send = tuple[WorkerKey, object]  # a message and the worker it goes to
PHASE_LOG_LEN = 1 << 16  # the latest prefill batches and steps kept (bounded: a long life)


@dataclass(frozen=True)
class PhaseRecord:
    """One prefill batch or decode step as its worker timed it (``time.monotonic()``)."""

    kind: str  # "prefill", "decode" or "mixed" (colocated: prefill chunks and decodes)
    worker: WorkerKey
    start_s: float
    end_s: float
    num_tokens: int  # prefill: prompt tokens; decode: requests; mixed: prompt tokens


PHASE_COUNTERS = (
    "prefill_batches", "prefill_tokens", "prefill_s", "decode_steps", "decode_tokens", "decode_s",
    "mixed_steps", "mixed_s",  # colocated: steps that ran prefill chunks and decodes together
)  # fmt: skip


# what a phase record adds to the counters: (batches or steps, tokens, seconds)
_PHASE_COUNTED = {
    "prefill": ("prefill_batches", "prefill_tokens", "prefill_s"),
    "decode": ("decode_steps", "decode_tokens", "decode_s"),
    "mixed": ("mixed_steps", "prefill_tokens", "mixed_s"),
}


class EngineCore:
    """``roles`` maps a role's name to what it does (``splitwiser.roles.make_roles``); their
    order is the scheduling order. ``chunked_prefill``: a prompt over the prefill budget may be
    prefilled in chunks (the handoff's ``allows_chunked_prefill``)."""

    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        checker: PromptChecker,
        eos_token_ids: tuple[int, ...],
        roles: dict[str, Role],
        chunked_prefill: bool = True,
    ):
        self.config = config
        self.checker = checker
        self.eos_token_ids = eos_token_ids
        self.pool = BlockPool(num_blocks, enable_caching=config.prefix_caching)
        self.scheduler = Scheduler(
            self.pool, config.block_size, config.max_prefill_tokens, chunked=chunked_prefill
        )
        self.roles = roles
        self.requests: dict[int, Request] = {}  # every unfinished request, and finished ones
        # whose blocks a worker still holds
        self.decode_queue: deque[Request] = deque()  # prefilled, waiting for a token worker
        # what each phase did, as the workers measured it: prefill batches, decode steps
        self.phase_counters = dict.fromkeys(PHASE_COUNTERS, 0.0)
        self.phase_log: deque[PhaseRecord] = deque(maxlen=PHASE_LOG_LEN)
        self.num_retried = 0  # requests run again after the worker running them died or hung
        self.num_preemptions = 0  # requests stopped to free their blocks, run again later
        # the stop strings of each unfinished request with some and a token, by request id
        self.stop_matchers: dict[int, StopStringMatcher] = {}
        self._request_ids = itertools.count()  # next() is atomic: callers on any thread
        self._batch_ids = itertools.count()
        self.phase_control: SloPhaseController | None = None
        if config.phase_control == "slo":
            self.phase_control = SloPhaseController(
                _seconds(config.ttft_slo_ms), _seconds(config.tpot_slo_ms),
                ladder(config.num_prompt_workers, config.max_prefill_tokens),
                config.phase_control_window_s, time.monotonic(),
            )  # fmt: skip

    # ------------------------------------------------------------------ inputs

    def new_request(self, prompt, params: SamplingParams, cancel=None) -> Request:
        """Validate a prompt into a request with its handle (any thread; ``cancel(request_id)``
        is what the handle's ``cancel()`` calls). Raises ``InvalidRequestError``, or
        ``KVCacheTooSmallError`` for a request that could never fit the pool."""
        token_ids = self.checker.token_ids(prompt)
        max_new = self.checker.max_new_tokens(len(token_ids), params)
        req = Request(
            request_id=next(self._request_ids),
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=token_ids,
            params=params,
            seed=params.seed if params.seed is not None else random.getrandbits(62),
            max_new_tokens=max_new,
            metrics=RequestMetrics(arrival_time=time.monotonic()),
        )
        needed = req.num_blocks_needed(self.config.block_size)
        if needed > self.pool.num_blocks:
            raise KVCacheTooSmallError(
                f"request needs {needed} KV blocks ({len(token_ids)} prompt + {max_new} new tokens "
                f"at block_size {self.config.block_size}) but the pool has only "
                f"{self.pool.num_blocks}; raise num_kv_blocks / kv_cache_bytes or lower "
                f"max_new_tokens"
            )
        req.handle = RequestHandle(req.request_id, cancel=cancel)
        return req

    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: int) -> list[Send]:
        """Cancel: ``result()`` returns what was generated, finish_reason "abort"."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return []
        self.scheduler.remove(req)
        return self.finish(req, "abort", time.monotonic())

    def on_message(self, worker: WorkerKey, msg) -> list[Send]:
        """A worker's message (its ``ReadyMsg`` is the process side's)."""
        if isinstance(msg, m.ReleasedMsg):
            for rid in msg.request_ids:
                req = self.requests.get(rid)
                if req is not None and req.owner == worker:
                    req.let_go()
                    if req.is_finished:
                        self.release(req)
                    else:  # preempted: its blocks go, it waits to run again
                        self.scheduler.requeue_front([req])
            return []
        if isinstance(msg, m.WorkerErrorMsg):  # the failed batch's requests: let go, failed
            error = SplitwiserError(f"{worker_name(worker)}: {msg.error}")
            for rid in msg.request_ids:
                req = self.requests.get(rid)
                if req is not None and req.owner == worker:
                    req.let_go()
                    if req.is_finished:  # ended meanwhile (an abort): its output stands
                        self.release(req)
                    else:
                        self.fail(req, error)
            return []
        return self.roles[worker[0]].on_message(self, worker, msg)

    def on_worker_lost(self, worker: WorkerKey, reason: str) -> None:
        """A worker died, hung or never got ready (it is dead now, so it holds no block): what
        it owned runs again, prefilled with its output so far."""
        orphans = []
        for req in self.owned_by(worker):
            req.let_go()
            if req.is_finished:  # only its abort was outstanding
                self.release(req)
            elif req.preempting:  # only its release was outstanding
                self.scheduler.requeue_front([req])
            else:
                orphans.append(req)
        self._retry(orphans, f"{worker_name(worker)} {reason}")

    def schedule(self, ready: dict[str, Iterable[int]]) -> list[Send]:
        """Work for the ready workers (``ready``: role -> indices), role by role; first, once
        per window, the phase control's step."""
        if self.phase_control is not None:
            level = self.phase_control.tick(time.monotonic())
            if level is not None:
                self.scheduler.prefill_concurrency = level.prefill_concurrency
                self.scheduler.max_prefill_tokens = level.max_prefill_tokens
        sends: list[Send] = []
        for name, role in self.roles.items():
            indices = list(ready.get(name, ()))
            if indices:
                sends += role.schedule(self, indices)
        return sends

    def fail_all(self, error: SplitwiserError) -> list[Send]:
        sends: list[Send] = []
        for req in list(self.requests.values()):
            if not req.is_finished:
                self.scheduler.remove(req)
                sends += self.fail(req, error)
        self.decode_queue.clear()
        return sends

    def close(self, error: SplitwiserError) -> None:
        """The pool goes with the pipeline: fail what is unfinished, forget every block."""
        for req in self.requests.values():
            req.handle._fail(error)
        self.requests.clear()
        self.decode_queue.clear()
        self.scheduler.waiting.clear()

    # ------------------------------------------------------------------ loads

    def owned_by(self, worker: WorkerKey) -> list[Request]:
        return [r for r in self.requests.values() if r.owner == worker]

    def owned_by_role(self, role: str) -> list[Request]:
        return [r for r in self.requests.values() if r.owner is not None and r.owner[0] == role]

    def loads(self, role: str) -> Counter:
        """Per worker index of ``role``: the work it holds, as the role balances it."""
        return self.roles[role].loads(self)

    def busy_workers(self) -> set[WorkerKey]:
        """Workers with work outstanding (the liveness clock runs for these)."""
        return {r.owner for r in self.requests.values() if r.owner is not None}

    def snapshot(self) -> dict:
        """The core's part of ``stats()``: blocks free (cached ones included: they are evicted
        when needed), cached among them, in use; the prefix cache's queries and hits in prompt
        tokens since the start; preemptions."""
        return {
            "num_free_blocks": self.pool.num_free,
            "num_cached_blocks": self.pool.num_cached_free,
            "num_used_blocks": self.pool.num_used,
            "prefix_cache_queries": self.scheduler.prefix_queries,
            "prefix_cache_hits": self.scheduler.prefix_hits,
            "num_preemptions": self.num_preemptions,
            "num_unfinished": sum(not r.is_finished for r in self.requests.values()),
            "num_retried": self.num_retried,
            "phases": dict(self.phase_counters),
            "phase_control": (
                {"mode": "static"} if self.phase_control is None else self.phase_control.snapshot()
            ),
        }

    # ------------------------------------------------------------------ what roles call

    def request(self, request_id: int) -> Request | None:
        return self.requests.get(request_id)

    def owned_request(self, worker: WorkerKey, request_id: int) -> Request | None:
        """The request if ``worker`` still owns it (None: it ended, or runs elsewhere now)."""
        req = self.requests.get(request_id)
        return req if req is not None and req.owner == worker else None

    def record_phase(self, kind: str, worker: WorkerKey, end_s: float, took_s: float, n: int):
        """A prefill batch, decode step or mixed step as its worker timed it (``n``: see
        ``PhaseRecord.num_tokens``): into the counters and the log."""
        batches, tokens, seconds = _PHASE_COUNTED[kind]
        c = self.phase_counters
        c[batches] += 1
        c[tokens] += n
        c[seconds] += took_s
        self.phase_log.append(PhaseRecord(kind, worker, end_s - took_s, end_s, n))

    def next_batch_id(self) -> int:
        return next(self._batch_ids)

    def next_prefill_batches(self, loads: dict[int, int]) -> list[tuple[int, list]]:
        """``Scheduler.schedule``: ``[(worker index, [(request, tokens to prefill)])]``."""
        return self.scheduler.schedule(loads, self.pool.num_used > 0)

    def continue_prefill(self, req: Request) -> None:
        self.scheduler.continue_prefill(req)

    def admit_next(self) -> Request | None:
        return self.scheduler.admit_next(self.pool.num_used > 0)

    def set_phase_slo(self, ttft_ms: float | None, tpot_ms: float | None) -> None:
        """The SLOs phase control steers by (``phase_control="slo"`` only)."""
        if self.phase_control is None:
            raise SplitwiserError("set_phase_slo needs phase_control='slo'")
        self.phase_control.set_slo(_seconds(ttft_ms), _seconds(tpot_ms))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; False while a request holds blocks (nothing done)."""
        return self.pool.reset()

    # ------------------------------------------------------------------ blocks as requests grow

    def publish(self, req: Request, num_written: int) -> None:
        """``req``'s first ``num_written`` tokens have their K/V in its blocks, as the worker
        writing them reported (its kernels finished before the report): its full blocks among
        them become reusable by any worker. Never earlier: another process would read half-
        written K/V."""
        full = min(num_written // self.config.block_size, len(req.block_ids or ()))
        if full <= req.num_published_blocks or not self.pool.enable_caching:
            return
        hashes = self.scheduler.hashes(req, full * self.config.block_size)
        for i in range(req.num_published_blocks, full):
            self.pool.publish(req.block_ids[i], hashes[i])
            self.scheduler.published(hashes[i])
        req.num_published_blocks = full

    def grant_blocks(self, role: str) -> list[Send]:
        """Each decoding request of ``role``'s workers holds blocks for its next
        ``num_lookahead_blocks`` blocks' worth of tokens beyond its current one, so that its
        worker never waits on this process: ``[(worker, GrantMsg)]`` for those that got more.
        When the pool runs dry the latest-arrived running requests are preempted (vLLM's
        policy) until the oldest get theirs; one that cannot be served yet is asked again
        next tick (its worker has its lookahead left, then sits it out)."""
        block_size = self.config.block_size
        ahead = self.config.num_lookahead_blocks * block_size
        grants: dict[WorkerKey, m.GrantMsg] = {}
        sends: list[Send] = []
        decoding = sorted(
            (r for r in self.owned_by_role(role)
             if r.status is RequestStatus.DECODING and not r.preempting),
            key=lambda r: r.request_id,
        )  # fmt: skip
        for req in decoding:
            if req.preempting:  # a victim of an older request's grant in this loop
                continue
            num_tokens = min(req.num_prompt_tokens + req.num_output_tokens + ahead,
                             req.max_num_tokens)  # fmt: skip
            num_new = -(-num_tokens // block_size) - len(req.block_ids)
            if num_new <= 0:
                continue
            while not self.pool.can_allocate(num_new) and self._releasing() < num_new:
                victim = self._preemption_victim()
                sends += self.preempt(victim)
                if victim is req:
                    break
            if req.preempting or not self.pool.can_allocate(num_new):
                continue
            new = self.pool.allocate(num_new)
            req.block_ids += new
            grant = grants.setdefault(req.owner, m.GrantMsg([], []))
            grant.request_ids.append(req.request_id)
            grant.block_ids.append(new)
        return sends + list(grants.items())

    def _releasing(self) -> int:
        """Blocks of preempted requests whose workers have yet to let go of them."""
        return sum(len(r.block_ids) for r in self.requests.values() if r.preempting)

    def _preemption_victim(self) -> Request:
        """The latest-arrived request holding blocks that can be stopped now: any but those in
        a prompt worker's batch, which runs to its end."""
        return max(
            (r for r in self.requests.values()
             if r.block_ids is not None and not r.is_finished and not r.preempting
             and (r.owner is None or self.roles[r.owner[0]].stop_msg([]) is not None)),
            key=lambda r: r.request_id,
        )  # fmt: skip

    def preempt(self, req: Request) -> list[Send]:
        """Free ``req``'s blocks and put it back at the head of the queue, to be prefilled
        again with its output so far (the lost worker's path: exact). A worker decoding it is
        told to drop it first; its blocks go at its ``ReleasedMsg``, and its tokens until then
        are dropped (the recompute makes them again)."""
        self.num_preemptions += 1
        if req.owner is None:
            self.scheduler.remove(req)
            self.scheduler.requeue_front([req])
            return []
        req.preempting = True
        return [(req.owner, self.roles[req.owner[0]].stop_msg([req.request_id]))]

    def queue_handoff(self, req: Request) -> None:
        """A prefilled request waits for a token worker (``take_handoffs``)."""
        self.decode_queue.append(req)

    def take_handoffs(self) -> Iterator[Request]:
        """The queued handoffs still due, oldest first, each taken as it is yielded (a request
        finished or run again meanwhile is dropped)."""
        while self.decode_queue:
            req = self.decode_queue.popleft()
            if req.status is RequestStatus.DECODING and req.handoff is not None:
                yield req

    # ------------------------------------------------------------------ tokens and endings

    def append_token(self, req: Request, token: int, now: float, logprobs=None) -> list[Send]:
        """The one place a generated token joins a request (with its ``TokenLogprobs`` if it
        asked for them); the stop rule decides its end."""
        req.output_token_ids.append(token)
        req.metrics.token_times.append(now)
        if self.phase_control is not None and len(req.metrics.token_times) == 1:
            self.phase_control.observe_ttft(now - req.metrics.arrival_time)
        if req.params.logprobs is not None:
            req.output_logprobs.append(logprobs)
        req.handle._push(token, logprobs)
        reason = stop_reason(
            token, req.num_output_tokens, req.max_new_tokens, req.params, self.eos_token_ids
        )
        text = None
        if req.params.stop:  # fed every token (made at the first), so it has the final text
            matcher = self.stop_matchers.get(req.request_id)
            if matcher is None:
                matcher = self.stop_matchers[req.request_id] = self.checker.stop_matcher(
                    req.params.stop
                )
            if matcher.add(token) and reason is None:
                reason, text = "stop", matcher.stopped_text
        if reason is None:
            return []
        return self.finish(req, reason, now, text)

    def finish(self, req: Request, reason: str | None, now: float, text=None) -> list[Send]:
        """End a request (``reason`` None: failed). Its blocks go at once if no worker owns it;
        otherwise once the owner lets go (a token worker is told to; a prompt worker lets go at
        the end of its batch)."""
        matcher = self.stop_matchers.pop(req.request_id, None)
        if text is None:
            text = self.checker.decode(req.output_token_ids) if matcher is None else matcher.text
        req.finish(reason, now, text)
        if self.phase_control is not None and reason is not None:
            tpot = req.metrics.tpot_s
            if tpot is not None:
                self.phase_control.observe_tpot(tpot)
        if req.owner is None:
            self.release(req)
            return []
        stop = self.roles[req.owner[0]].stop_msg([req.request_id])
        return [] if stop is None else [(req.owner, stop)]

    def fail(self, req: Request, error: SplitwiserError) -> list[Send]:
        req.handle._fail(error)  # at once: the caller need not wait for the blocks
        return self.finish(req, None, time.monotonic(), text="")

    def release(self, req: Request) -> None:
        """Free the blocks, then resolve the handle: so after generate(), all blocks are free."""
        assert req.is_finished and req.owner is None
        self.scheduler.free(req)
        self.requests.pop(req.request_id, None)
        if req.finish_reason is not None:
            req.handle._finish(req.output())

    # ------------------------------------------------------------------ retries

    def _retry(self, reqs: list[Request], what: str) -> None:
        """Prefill again (a resumed request: prompt and output so far) and go on decoding on a
        live worker; the caller sees the same tokens, none twice. A request lost more than
        ``max_request_retries`` times in a row without a new token fails."""
        again = []
        for req in sorted(reqs, key=lambda r: r.request_id):
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


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def worker_name(worker: WorkerKey) -> str:
    """The process name of a worker: ``splitwiser-token-1``."""
    role, index = worker
    return f"splitwiser-{role}-{index}"


__all__ = ["EngineCore", "RequestStatus", "Send", "worker_name"]
