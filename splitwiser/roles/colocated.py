"""The colocated role: ONE worker process runs both phases on the same data plane, with vLLM v1's
policy. The parent hands a request to the worker whole (its blocks reserved first); each step
the worker takes the running decodes first, then fills the rest of a token budget
(``max_num_batched_tokens``) with prefill chunks, first come first served, under
``max_num_seqs``; a step with chunks is one forward over the mixed batch, a decode-only step is
the token worker's (CUDA graphs on CUDA). A request's first token comes in a ``TokensMsg``."""

from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass

import torch

from splitwiser.config import EngineConfig
from splitwiser.core import messages as m
from splitwiser.core.engine_core import EngineCore, Send
from splitwiser.core.request import WorkerKey
from splitwiser.core.stop import stop_reason
from splitwiser.roles.base import RoleSpec, append_step, requests_per_worker
from splitwiser.sampling import sample_next, token_logprobs
from splitwiser.worker.context import WorkerConfig, phase_range, settle
from splitwiser.worker.decoding import DecodingWorker
from splitwiser.worker.model_runner import PrefillSeq

NAME = "colocated"


class ColocatedRole:
    """The parent side: whole requests to the ready colocated workers, a few queued beyond the
    running ones; their steps' tokens (a mixed step also prefilled chunks)."""

    def __init__(self, max_outstanding: int):
        self.max_outstanding = max_outstanding  # requests a worker holds: running and queued

    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        sends = core.grant_blocks(NAME)  # the running requests' blocks before new ones
        loads = self.loads(core)
        now = time.monotonic()
        while True:
            index = min(ready, key=lambda i: loads[i])
            if loads[index] >= self.max_outstanding:
                break
            req = core.admit_next()
            if req is None:
                break
            key = (NAME, index)
            req.start_prefill(key, None, now)
            loads[index] += 1
            next_token = req.output_token_ids[-1] if req.is_resumed else None
            msg = m.RunMsg(
                req.spec(), req.prefill_token_ids, list(req.block_ids), next_token,
                req.num_computed_tokens,
            )  # fmt: skip
            sends.append((key, msg))
        return sends

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        if not isinstance(msg, m.TokensMsg):
            raise TypeError(f"a colocated worker sent {type(msg).__name__}")
        end_s = msg.started_at + msg.step_s
        if msg.num_prefill_tokens:  # a mixed step: prefill chunks and decodes in one forward
            core.record_phase("mixed", worker, end_s, msg.step_s, msg.num_prefill_tokens)
        else:
            core.record_phase("decode", worker, end_s, msg.step_s, len(msg.request_ids))
        return append_step(core, worker, msg, time.monotonic())

    def stop_msg(self, request_ids: list[int]):
        return m.AbortMsg(request_ids)

    def loads(self, core: EngineCore) -> Counter:
        """Per colocated worker: its requests, running and queued."""
        return requests_per_worker(core, NAME)


@dataclass
class _Prefilling:
    run: m.RunMsg
    num_computed: int = 0  # tokens of ``run.token_ids`` whose K/V are in the blocks

    @property
    def request(self) -> m.RequestSpec:
        return self.run.request

    @property
    def block_ids(self) -> list[int]:
        return self.run.block_ids

    @property
    def num_left(self) -> int:
        return len(self.run.token_ids) - self.num_computed


@dataclass
class _Decoding:
    spec: m.RequestSpec
    block_ids: list[int]
    next_token: int  # its next input (host copy of the batch row's)
    num_generated: int


class ColocatedWorker(DecodingWorker):
    """The worker's loop. ``self.queued``: the requests being prefilled, FCFS, the one being
    chunked first."""

    accepts = m.RunMsg

    def queue(self, msg: m.RunMsg) -> None:
        self.queued.append(_Prefilling(msg, msg.num_computed))

    def run(self) -> None:
        self.budget = self.cfg.max_num_batched_tokens
        while True:
            # 1) receive: block while idle, otherwise take what arrived since the last step
            if self.receive(block=self.idle):
                return
            # 2) schedule: the decodes (a request whose next token has no block yet sits this
            # step out), then prefill chunks up to the token budget
            self.park_starved()
            chunks = self._schedule()
            if not self.rows and not chunks:
                continue
            # 3) run one step, 4) publish its tokens
            try:
                self.out_conn.send(self._step(chunks))
            except Exception:
                ids = [s.spec.request_id for s in self.rows]
                ids += [p.request.request_id for p in self.queued]
                self.rows.clear()
                self.queued.clear()
                self.batch.clear()
                settle(self.device)
                self.out_conn.send(m.WorkerErrorMsg(ids, traceback.format_exc(limit=4)))

    def _schedule(self) -> list[tuple[_Prefilling, int]]:
        """Prefill chunks for this step: ``[(request, chunk length)]``. The decodes take one
        token of the budget each; a request being prefilled counts as running."""
        left = self.budget - len(self.rows)
        chunks = []
        for p in self.queued:
            if left <= 0 or self.num_running + len(chunks) >= self.cfg.max_num_seqs:
                break
            n = min(p.num_left, left)
            chunks.append((p, n))
            left -= n
        return chunks

    @torch.inference_mode()
    def _step(self, chunks: list[tuple[_Prefilling, int]]) -> m.TokensMsg:
        t0 = time.monotonic()
        rows, num_rows = list(self.rows), len(self.rows)
        num_prefill = sum(n for _, n in chunks)
        name = f"step b={num_rows} t={num_prefill}"
        with phase_range(self.cfg, self.device, name):
            if not chunks:  # decode only: the persistent batch (CUDA graphs)
                logits = self.runner.decode(self.batch, self.kv_pool)  # [B, vocab]
            else:  # one forward: each decode a 1-token chunk, then the prefill chunks
                seqs = [
                    PrefillSeq([r.next_token], r.block_ids, pos)
                    for r, pos in zip(rows, self.batch.host_positions)
                ]
                seqs += [
                    PrefillSeq(p.run.token_ids[p.num_computed : p.num_computed + n],
                               p.run.block_ids, p.num_computed)
                    for p, n in chunks
                ]  # fmt: skip
                logits = self.runner.prefill(seqs, self.kv_pool)  # [B + chunks, vocab]
            sample = [(r.spec.params, r.spec.seed, r.num_generated) for r in rows]
            ended = [p for p, n in chunks if n == p.num_left]  # their prompt is complete
            picks = list(range(num_rows))
            for j, (p, n) in enumerate(chunks):
                if n == p.num_left and p.run.next_token is None:
                    spec = p.run.request
                    sample.append((spec.params, spec.seed, 0))  # its first token
                    picks.append(num_rows + j)
            logprobs = None
            if picks:
                new = sample_next(logits[picks], sample, self.eos)
            else:
                new = logits.new_zeros(0).long()
            if num_rows:
                self.batch.advance(new[:num_rows])
            tokens = new.tolist()  # the step's one host synchronisation
            if picks:  # in the order of ``tokens``, as the message's tokens
                logprobs = token_logprobs(logits[picks], new, sample)
        ids, out, finished = [], [], []
        for r, tok in zip(rows, tokens):
            r.num_generated += 1
            r.next_token = tok
            ids.append(r.spec.request_id)
            out.append(tok)
            finished.append(self._stops(r.spec, tok, r.num_generated))
        for row in reversed(range(num_rows)):  # highest first: moves never touch a done row
            if finished[row]:
                self.remove(row)
        for p, n in chunks:
            p.num_computed += n
        firsts = iter(tokens[num_rows:])
        for p in ended:
            self.queued.remove(p)
            run = p.run
            first = run.next_token
            if first is None:  # a fresh request: its first token is reported
                first = next(firsts)
                ids.append(run.request.request_id)
                out.append(first)
                done = self._stops(run.request, first, 1)
                finished.append(done)
                if done:
                    continue
            self.batch.add(run.block_ids, len(run.token_ids), first)
            self.rows.append(_Decoding(run.request, run.block_ids, first, 1))
        return m.TokensMsg(
            ids,
            out,
            finished,
            step_s=time.monotonic() - t0,
            started_at=t0,
            num_prefill_tokens=num_prefill,
            logprobs=logprobs,
        )

    def _stops(self, spec: m.RequestSpec, token: int, num_generated: int) -> bool:
        """The parent applies the same rule to the same token."""
        reason = stop_reason(token, num_generated, spec.max_new_tokens, spec.params, self.eos)
        return reason is not None


def _make(config: EngineConfig) -> ColocatedRole:
    # a few requests queued beyond the running ones: no idle step
    return ColocatedRole(max_outstanding=2 * config.max_num_seqs)


def _prefill_budget(cfg: WorkerConfig) -> int:
    return cfg.max_num_batched_tokens


SPEC = RoleSpec(
    name=NAME, make=_make, worker=ColocatedWorker, prefill_budget=_prefill_budget, decodes=True,
    num_workers=lambda config: 1 if config.colocated else 0,
)  # fmt: skip
