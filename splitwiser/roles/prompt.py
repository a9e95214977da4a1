"""The prompt role: FCFS prefill batches under a token budget, a few in flight per worker, each
finished prefill handed on to a token worker. Its workers run batched prefill of whole prompts (a
prompt over the budget in chunks) and publish once the kernels finished."""

from __future__ import annotations

import time
import traceback
from collections import Counter

from splitwiser.core import messages as m
from splitwiser.core.engine_core import EngineCore, Send
from splitwiser.core.request import WorkerKey
from splitwiser.roles.base import RoleSpec
from splitwiser.sampling import sample_next, token_logprobs
from splitwiser.worker.context import (
    WorkerConfig,
    WorkerParts,
    get_msg,
    phase_range,
    settle,
    synchronize,
)
from splitwiser.worker.model_runner import PrefillSeq

NAME = "prompt"


class PromptRole:
    """The parent side: batches for the ready prompt workers; a finished prefill becomes a
    handoff waiting for a token worker."""

    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        loads = self.loads(core)
        sends: list[Send] = []
        now = time.monotonic()
        for index, batch in core.next_prefill_batches({i: loads[i] for i in ready}):
            batch_id = core.next_batch_id()
            for req, n in batch:
                req.start_prefill((NAME, index), batch_id, now, n)
            msg = m.PrefillMsg(
                requests=[r.spec() for r, _ in batch],
                token_ids=[
                    r.prefill_token_ids[r.num_computed_tokens : r.num_computed_tokens + n]
                    for r, n in batch
                ],
                block_ids=[list(r.block_ids) for r, _ in batch],
                num_computed=[r.num_computed_tokens for r, _ in batch],
            )
            sends.append(((NAME, index), msg))
        return sends

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        if not isinstance(msg, m.PrefillDoneMsg):
            raise TypeError(f"a prompt worker sent {type(msg).__name__}")
        core.record_phase("prefill", worker, msg.published_at, msg.compute_s, msg.batch_tokens)
        now = time.monotonic()
        sends: list[Send] = []
        for i, rid in enumerate(msg.request_ids):
            req = core.owned_request(worker, rid)
            if req is None:
                continue  # run again elsewhere meanwhile
            if req.is_finished:  # aborted during its prefill: its blocks go now
                req.let_go()
                core.release(req)
                continue
            done = req.chunk_prefilled()
            core.publish(req, req.num_computed_tokens)
            if not done:  # its next chunk goes in a later batch
                core.continue_prefill(req)
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
                req.spec(), list(req.block_ids), req.num_prefill_tokens, req.output_token_ids[-1],
                msg.published_at, kv,
            )  # fmt: skip
            core.queue_handoff(req)
        return sends

    def stop_msg(self, request_ids: list[int]):
        return None  # a prefill batch runs to its end; the blocks go at its PrefillDoneMsg

    def loads(self, core: EngineCore) -> Counter:
        """Per prompt worker: its batches in flight."""
        batches = {(r.owner[1], r.batch_id) for r in core.owned_by_role(NAME)}
        return Counter(index for index, _ in batches)


class PromptWorker:
    """The worker's loop: one prefill batch at a time, K/V where the handoff puts them."""

    def __init__(self, parts: WorkerParts):
        self.cfg, self.runner, self.kv_pool = parts.cfg, parts.runner, parts.kv_pool
        self.in_conn, self.out_conn, self.device = parts.in_conn, parts.out_conn, parts.device
        self.handoff = parts.handoff

    def run(self) -> None:
        while True:
            msg = get_msg(self.in_conn, block=True)  # 1) receive
            if isinstance(msg, m.ShutdownMsg):
                return
            try:  # 2) run the batch, 3) publish it
                self.out_conn.send(self.prefill(msg))
            except Exception:
                ids = [r.request_id for r in msg.requests]
                settle(self.device)
                self.out_conn.send(m.WorkerErrorMsg(ids, traceback.format_exc(limit=4)))

    def prefill(self, msg: m.PrefillMsg) -> m.PrefillDoneMsg:
        t0 = time.monotonic()
        computed = msg.num_computed or [0] * len(msg.token_ids)
        seqs = [PrefillSeq(*x) for x in zip(msg.token_ids, msg.block_ids, computed)]
        total = sum(len(t) for t in msg.token_ids)
        target, contiguous = self.handoff.prefill_target(self.kv_pool, total, self.device)
        with phase_range(self.cfg, self.device, f"prefill b={len(seqs)} t={total}"):
            logits = self.runner.prefill(seqs, target, contiguous_slots=contiguous)  # [B, vocab]
            rows = [(r.params, r.seed, 0) for r in msg.requests]
            new = sample_next(logits, rows, self.cfg.eos_token_ids)
            first = new.tolist()
            first_logprobs = token_logprobs(logits, new, rows)
        # NOTE: publish only after the prefill kernels finished: the token worker reads at once
        synchronize(self.device)
        done = time.monotonic()  # the K/V are ready: the handoff starts here, in both modes
        return m.PrefillDoneMsg(
            request_ids=[r.request_id for r in msg.requests],
            first_tokens=first,
            published_at=done,
            kv_copies=self.handoff.publish(target, msg.token_ids, self.device),
            first_logprobs=first_logprobs,
            batch_tokens=total,
            compute_s=done - t0,
        )


def _prefill_budget(cfg: WorkerConfig) -> int:
    return cfg.max_prefill_tokens


SPEC = RoleSpec(
    name=NAME,
    make=lambda config: PromptRole(),
    worker=PromptWorker,
    prefill_budget=_prefill_budget,
    decodes=False,
    mps_share=0,
    phase="prefill",
    num_workers=lambda config: 0 if config.colocated else config.num_prompt_workers,
)
