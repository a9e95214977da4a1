"""Worker roles: what work a role's workers accept from the core and what their reports do.

A role is a small interface (``Role``): ``schedule`` picks work for its ready workers,
``on_message`` turns their reports into tokens and handoffs through the core, ``stop_msg`` tells
one of them to let go of requests it owns. The core routes by the role in a worker's key, so a
new role (a worker that runs both phases, say) is a new class here and touches neither of these.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from splitwiser.core import messages as m
from splitwiser.core.request import RequestStatus, WorkerKey

if TYPE_CHECKING:
    from splitwiser.core.engine_core import EngineCore, Send


class Role(Protocol):
    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        """Work for this role's ready workers (their indices)."""

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        """A report of one of this role's workers."""

    def stop_msg(self, request_ids: list[int]):
        """The message that makes a worker let go of these requests (it answers with a
        ``ReleasedMsg``), or ``None`` where the worker lets go by itself (at the end of its
        batch)."""


class PromptRole:
    """Prompt workers: FCFS prefill batches under a token budget, a few in flight per worker;
    a finished prefill becomes a handoff waiting for a token worker."""

    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        loads = core.loads("prompt")
        sends: list[Send] = []
        now = time.monotonic()
        for index, batch in core.scheduler.schedule({i: loads[i] for i in ready}):
            batch_id = core.next_batch_id()
            for req, n in batch:
                req.start_prefill(("prompt", index), batch_id, now, n)
            msg = m.PrefillMsg(
                requests=[r.spec() for r, _ in batch],
                token_ids=[
                    r.prefill_token_ids[r.num_computed_tokens : r.num_computed_tokens + n]
                    for r, n in batch
                ],
                block_ids=[r.block_ids for r, _ in batch],
                num_computed=[r.num_computed_tokens for r, _ in batch],
            )
            sends.append((("prompt", index), msg))
        return sends

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        if not isinstance(msg, m.PrefillDoneMsg):
            raise TypeError(f"a prompt worker sent {type(msg).__name__}")
        c = core.phase_counters
        c["prefill_batches"] += 1
        c["prefill_tokens"] += msg.batch_tokens
        c["prefill_s"] += msg.compute_s
        core.log_phase("prefill", worker, msg.published_at, msg.compute_s, msg.batch_tokens)
        now = time.monotonic()
        sends: list[Send] = []
        for i, rid in enumerate(msg.request_ids):
            req = core.requests.get(rid)
            if req is None or req.owner != worker:
                continue  # run again elsewhere meanwhile
            if req.is_finished:  # aborted during its prefill: its blocks go now
                req.let_go()
                core.release(req)
                continue
            if not req.chunk_prefilled():  # its next chunk goes in a later batch
                core.scheduler.continue_prefill(req)
                continue
            if not req.is_resumed:
                lp = msg.first_logprobs[i] if msg.first_logprobs is not None else None
                sends += core.append_token(req, msg.first_tokens[i], now, lp)
                if req.is_finished:
                    continue
            # NOTE: a resumed request drops the token the prompt worker sampled: its last
            # generated token, not yet cached, is the next input, as after a first prefill
            kv = msg.kv_copies[i] if msg.kv_copies is not None else None
            if kv is not None:
                req.metrics.kv_bytes_copied += kv.nbytes
            req.handoff = m.HandoffMsg(
                req.spec(), req.block_ids, req.num_prefill_tokens, req.output_token_ids[-1],
                msg.published_at, kv,
            )  # fmt: skip
            core.decode_queue.append(req)
        return sends

    def stop_msg(self, request_ids: list[int]):
        return None  # a prefill batch runs to its end; the blocks go at its PrefillDoneMsg


class TokenRole:
    """Token workers: each prefilled request goes to the one with the fewest live requests;
    its decode steps report tokens."""

    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        loads = core.loads("token")
        sends: list[Send] = []
        while core.decode_queue:
            req = core.decode_queue.popleft()
            if req.status is not RequestStatus.DECODING or req.handoff is None:
                continue  # finished or run again since it was queued
            index = min(ready, key=lambda i: loads[i])
            loads[index] += 1  # this tick's picture: the request is owned from here on
            sends.append((("token", index), req.hand_off(("token", index))))
        return sends

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        if not isinstance(msg, m.TokensMsg):
            raise TypeError(f"a token worker sent {type(msg).__name__}")
        c = core.phase_counters
        c["decode_steps"] += 1
        c["decode_tokens"] += len(msg.request_ids)
        c["decode_s"] += msg.step_s
        core.log_phase(
            "decode", worker, msg.started_at + msg.step_s, msg.step_s, len(msg.request_ids)
        )
        for rid, handoff_s in msg.handoff_s.items():
            if rid in core.requests:
                core.requests[rid].metrics.handoff_s = handoff_s
        return _append_step(core, worker, msg, time.monotonic())

    def stop_msg(self, request_ids: list[int]):
        return m.AbortMsg(request_ids)


class ColocatedRole:
    """Colocated workers run both phases: a request goes to one whole (its blocks reserved
    first), which prefills it in chunks within its step budget and decodes it; its first token
    comes in a ``TokensMsg`` like the others."""

    def __init__(self, max_outstanding: int):
        self.max_outstanding = max_outstanding  # requests a worker holds: running and queued

    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        loads = core.loads("colocated")
        sends: list[Send] = []
        now = time.monotonic()
        while True:
            index = min(ready, key=lambda i: loads[i])
            if loads[index] >= self.max_outstanding:
                break
            req = core.scheduler.admit_next()
            if req is None:
                break
            key = ("colocated", index)
            req.start_prefill(key, None, now)
            loads[index] += 1
            next_token = req.output_token_ids[-1] if req.is_resumed else None
            msg = m.RunMsg(req.spec(), req.prefill_token_ids, req.block_ids, next_token)
            sends.append((key, msg))
        return sends

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        if not isinstance(msg, m.TokensMsg):
            raise TypeError(f"a colocated worker sent {type(msg).__name__}")
        c = core.phase_counters
        end_s = msg.started_at + msg.step_s
        if msg.num_prefill_tokens:  # a mixed step: prefill chunks and decodes in one forward
            c["mixed_steps"] += 1
            c["mixed_s"] += msg.step_s
            c["prefill_tokens"] += msg.num_prefill_tokens
            core.log_phase("mixed", worker, end_s, msg.step_s, msg.num_prefill_tokens)
        else:
            c["decode_steps"] += 1
            c["decode_tokens"] += len(msg.request_ids)
            c["decode_s"] += msg.step_s
            core.log_phase("decode", worker, end_s, msg.step_s, len(msg.request_ids))
        return _append_step(core, worker, msg, time.monotonic())

    def stop_msg(self, request_ids: list[int]):
        return m.AbortMsg(request_ids)


def _append_step(core: EngineCore, worker: WorkerKey, msg: m.TokensMsg, now: float) -> list[Send]:
    """A step's tokens, request by request; ``finished``: the worker let go of the request."""
    sends: list[Send] = []
    logprobs = msg.logprobs if msg.logprobs is not None else [None] * len(msg.tokens)
    for rid, token, done, lp in zip(msg.request_ids, msg.tokens, msg.finished, logprobs):
        req = core.requests.get(rid)
        if req is None or req.owner != worker:
            continue
        if done:  # the worker applied the same stop rule: it let go of the request
            req.let_go()
        if req.is_finished:  # a stop string or an abort ended it; its release is on its way
            if req.owner is None:
                core.release(req)
            continue
        if req.status is RequestStatus.PREFILLING:  # colocated: its prefill ended in this step
            req.decoding_in_place()
        sends += core.append_token(req, token, now, lp)
    return sends
