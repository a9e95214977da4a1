"""The token worker's loop: continuous-batch decode over the persistent ``DecodeBatch``,
admitting handed-off requests at step boundaries."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

from splitwiser.core import messages as m
from splitwiser.core.prompts import stop_reason
from splitwiser.kv.pool import slots_for
from splitwiser.sampling import sample_next, token_logprobs
from splitwiser.worker.decoding import DecodingWorker
from splitwiser.worker.main import phase_range, settle, synchronize


@dataclass
class _RunningSeq:
    spec: m.RequestSpec
    num_generated: int


class TokenWorker(DecodingWorker):
    """Continuous batching over the persistent ``DecodeBatch``; handed-off requests join at
    step boundaries."""

    accepts = m.HandoffMsg

    def run(self) -> None:
        while True:
            # 1) receive: block while idle, otherwise take what arrived since the last step
            if self.receive(block=not self.rows and not self.queued):
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
                settle(self.device)
                self.out_conn.send(m.WorkerErrorMsg(ids, traceback.format_exc(limit=4)))

    def _admit(self) -> dict[int, float]:
        handoff_s = {}
        while self.queued and len(self.rows) < self.cfg.max_num_seqs:
            h = self.queued.popleft()
            if h.kv_copy is not None:  # copy handoff: scatter the received K/V into the blocks
                slots = slots_for(h.block_ids, h.prompt_len, self.cfg.block_size, self.device)
                kv = h.kv_copy.open()  # CUDA: maps the prompt worker's buffer
                self.kv_pool[:, :, slots] = kv  # device to device on CUDA
                synchronize(self.device)  # the handoff ends when the K/V are in place
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
            rows = [(s.spec.params, s.spec.seed, s.num_generated) for s in seqs]
            new = sample_next(logits, rows, self.eos)
            self.batch.advance(new)
            tokens = new.tolist()  # the step's one host synchronisation
            logprobs = token_logprobs(logits, new, rows)  # (and one more if asked for)
        finished = []
        for s, tok in zip(seqs, tokens):
            s.num_generated += 1
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
