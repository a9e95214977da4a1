"""The token role: each prefilled request goes to a token worker (``pick_token_worker``), whose
decode steps report its tokens. Its workers run continuous-batch decode over the
persistent ``DecodeBatch``, admitting handed-off requests at step boundaries."""

from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass

from splitwiser.core import messages as m
from splitwiser.core.engine_core import EngineCore, Send
from splitwiser.core.request import WorkerKey
from splitwiser.core.stop import stop_reason
from splitwiser.roles.base import RoleSpec, append_step, requests_per_worker
from splitwiser.sampling import sample_next, token_logprobs
from splitwiser.worker.context import phase_range, settle
from splitwiser.worker.decoding import DecodingWorker

NAME = "token"


class TokenRole:
    """The parent side: handoffs to the ready token workers; their steps' tokens."""

    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        sends = core.grant_blocks(NAME)  # first: their K/V already occupy blocks
        loads = self.loads(core)
        for req in core.take_handoffs():
            index = pick_token_worker(ready, loads, core.config.decode_fill_seqs)
            loads[index] += 1  # this tick's picture: the request is owned from here on
            sends.append(((NAME, index), req.hand_off((NAME, index))))
        return sends

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        if not isinstance(msg, m.TokensMsg):
            raise TypeError(f"a token worker sent {type(msg).__name__}")
        end_s = msg.started_at + msg.step_s
        core.record_phase("decode", worker, end_s, msg.step_s, len(msg.request_ids))
        for rid, handoff_s in msg.handoff_s.items():
            req = core.request(rid)
            if req is not None:
                req.metrics.handoff_s = handoff_s
        return append_step(core, worker, msg, time.monotonic())

    def stop_msg(self, request_ids: list[int]):
        return m.AbortMsg(request_ids)

    def loads(self, core: EngineCore) -> Counter:
        """Per token worker: its live requests."""
        return requests_per_worker(core, NAME)


def pick_token_worker(ready: list[int], loads: Counter, fill: int) -> int:
    """The token worker a prefilled request joins: the fullest with fewer than ``fill``
    requests (the lowest index among equals), else the least loaded.

    A decode step's time on a small batch is mostly reading the weights (on the CPU, the
    embedded model at one thread: 4.5 ms at batch 1, 6.5 at 4, 11.6 at 16), so two half-full
    workers pay nearly twice what one full one does for the same tokens; past ``fill`` the
    second worker's parallelism pays."""
    under = [i for i in ready if loads[i] < fill]
    if under:
        return max(under, key=lambda i: (loads[i], -i))
    return min(ready, key=lambda i: loads[i])


@dataclass
class _RunningSeq:
    spec: m.RequestSpec
    num_generated: int
    block_ids: list[int]
    next_token: int  # its next input (host copy of the batch row's)


class TokenWorker(DecodingWorker):
    """The worker's loop: continuous batching over the persistent ``DecodeBatch``; handed-off
    requests join at step boundaries."""

    accepts = m.HandoffMsg

    def run(self) -> None:
        while True:
            # 1) receive: block while idle, otherwise take what arrived since the last step
            if self.receive(block=self.idle):
                return
            # 2) admit handed-off requests at the step boundary (a request whose next token has
            # no block yet sits this step out)
            handoff_s = self._admit()
            self.park_starved()
            if not self.rows:
                continue
            # 3) run one decode step, 4) publish its tokens
            try:
                self.out_conn.send(self._step(handoff_s))
            except Exception:
                ids = [s.spec.request_id for s in self.rows]
                self.rows.clear()
                self.batch.clear()
                settle(self.device)
                self.out_conn.send(m.WorkerErrorMsg(ids, traceback.format_exc(limit=4)))

    def _admit(self) -> dict[int, float]:
        handoff_s = {}
        while self.queued and self.num_running < self.cfg.max_num_seqs:
            h = self.queued.popleft()
            self.handoff.receive(h, self.kv_pool, self.cfg.block_size, self.device)
            self.batch.add(h.block_ids, h.prompt_len, h.first_token)
            self.rows.append(_RunningSeq(h.request, 1, h.block_ids, h.first_token))
            handoff_s[h.request.request_id] = time.monotonic() - h.published_at
        return handoff_s

    def _step(self, handoff_s: dict[int, float]) -> m.TokensMsg:
        t0 = time.monotonic()
        seqs = list(self.rows)
        with phase_range(self.cfg, self.device, f"decode b={len(seqs)}"):
            logits = self.runner.decode(self.batch, self.kv_pool)  # [B, vocab]
            rows = [(s.spec.params, s.spec.seed, s.num_generated) for s in seqs]
            new = sample_next(logits, rows, self.eos)
            self.batch.advance(new)
            tokens = new.tolist()  # the step's one host synchronisation
            logprobs = token_logprobs(logits, new, rows)  # (and one more if asked for)
        finished = []
        for s, tok in zip(seqs, tokens):
            s.num_generated += 1
            s.next_token = tok
            spec = s.spec
            reason = stop_reason(tok, s.num_generated, spec.max_new_tokens, spec.params, self.eos)
            finished.append(reason is not None)  # the parent applies the same rule to the token
        for row in reversed(range(len(seqs))):  # highest first: moves never touch a done row
            if finished[row]:
                self.remove(row)
        ids = [s.spec.request_id for s in seqs]
        return m.TokensMsg(
            ids, tokens, finished, handoff_s, time.monotonic() - t0, t0, logprobs=logprobs
        )


SPEC = RoleSpec(
    name=NAME,
    make=lambda config: TokenRole(),
    worker=TokenWorker,
    prefill_budget=None,
    decodes=True,
    mps_share=1,
    phase="decode",
    schedule_rank=0,
    num_workers=lambda config: 0 if config.colocated else config.num_token_workers,
)
