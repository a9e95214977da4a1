"""The token worker's loop: continuous-batch decode over the persistent ``DecodeBatch``,
admitting handed-off requests at step boundaries."""

from __future__ import annotations

import queue
import time
import traceback
from collections import deque
from dataclasses import dataclass

from splitwiser.engine import messages as m
from splitwiser.engine.decode_batch import DecodeBatch
from splitwiser.engine.kv_pool import slots_for
from splitwiser.engine.model_runner import ModelRunner
from splitwiser.engine.worker import get_msg, phase_range, settle, synchronize
from splitwiser.prompts import stop_reason
from splitwiser.sampling import sample_next


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
        self.eos = cfg.eos_token_ids

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
                settle(self.device)
                self.out_conn.send(m.WorkerErrorMsg(ids, traceback.format_exc(limit=4)))

    def _receive(self, block: bool) -> bool:
        """Drain the incoming messages; True when asked to shut down."""
        while True:
            try:
                msg = get_msg(self.in_conn, block)
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
        self.out_conn.send(m.ReleasedMsg(sorted(ids)))

    def _admit(self) -> dict[int, float]:
        handoff_s = {}
        while self.pending and len(self.rows) < self.cfg.max_num_seqs:
            h = self.pending.popleft()
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
            new = sample_next(logits, [(s.spec.params, s.spec.seed, s.num_generated) for s in seqs])
            self.batch.advance(new)
            tokens = new.tolist()  # the step's one host synchronisation
        finished = []
        for s, tok in zip(seqs, tokens):
            s.num_generated += 1
            spec = s.spec
            reason = stop_reason(tok, s.num_generated, spec.max_new_tokens, spec.params, self.eos)
            finished.append(reason is not None)  # the parent applies the same rule to the token
        for row in reversed(range(len(seqs))):  # highest first: moves never touch a done row
            if finished[row]:
                self._remove(row)
        ids = [s.spec.request_id for s in seqs]
        return m.TokensMsg(ids, tokens, finished, handoff_s, time.monotonic() - t0, t0)
