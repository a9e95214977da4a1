"""The engine core under every order of its messages, in one process.

Scripted workers send what the real ones send, when they may send it (prompt_worker.py,
token_worker.py, colocated_worker.py), and ``Pipeline`` routes between them and the core as the
engine thread does (engine.py). Orders drawn from fixed seeds interleave new requests, aborts,
stop strings, steps, releases, failed steps and lost workers; a few orders are written out for
the races that matter most. Pools are often too small for every request at once (requests are
preempted and run again) and prompts share prefixes (blocks are shared through the prefix cache).
After every event the books must balance: each block's reference count is the number of held
requests whose table holds it, a finished request is held only while a worker still owns it,
every owner is alive, and a worker writes only into the blocks of requests it owns, never into a
published block, and only where it was granted blocks. The K/V the scripted workers write are
modelled (token ids per slot): every prefill chunk and decode step checks that what it attends to
holds its request's tokens, so a block published or shared before its writer reported it done
fails the run. At the end of every run every block is free, every handle resolved, and the core
holds nothing.
"""

from __future__ import annotations

import os
import random
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass

import pytest

from splitwiser.config import EngineConfig
from splitwiser.core import messages as m
from splitwiser.core.engine_core import PHASE_COUNTERS, EngineCore
from splitwiser.core.prompts import PromptChecker, stop_reason
from splitwiser.core.request import Request, RequestStatus, WorkerKey
from splitwiser.errors import SplitwiserError, WorkerCrashedError
from splitwiser.handoff import select_handoff
from splitwiser.models.default import build_tokenizer
from splitwiser.outputs import TokenLogprobs
from splitwiser.roles import make_roles, workers_per_role
from splitwiser.sampling import SamplingParams

P0, T0, C0 = ("prompt", 0), ("token", 0), ("colocated", 0)
BLOCK_SIZE = 4
WORDS = ("a", "b", "at", " c")  # one token each
STOP_STRINGS = ("ab", "ta", "b c", "cat")  # each spans two of the words
# random orders per pipeline kind; raise them to search longer
NUM_SPLIT_ORDERS = int(os.environ.get("SPLITWISER_SPLIT_ORDERS", "3000"))
NUM_COLOCATED_ORDERS = int(os.environ.get("SPLITWISER_COLOCATED_ORDERS", "2500"))
MAX_EVENTS = 5000  # a run still unsettled after this many events is stuck


def stops(spec: m.RequestSpec, token: int, num_generated: int, eos: tuple[int, ...]) -> bool:
    """The workers' stop rule: the parent's without stop strings (a worker knows no text)."""
    return stop_reason(token, num_generated, spec.max_new_tokens, spec.params, eos) is not None


def logprobs(specs: list[m.RequestSpec], tokens: list[int]) -> list | None:
    """``token_logprobs``: each token's where its request asked for them; None if none did."""
    if all(s.params.logprobs is None for s in specs):
        return None
    return [
        None if s.params.logprobs is None else TokenLogprobs(t, -1.0, [])
        for s, t in zip(specs, tokens)
    ]


class ScriptedModel:
    """Greedy decoding as a table: request ``rid`` with ``num_context`` tokens in its context
    (its prompt, then its output) predicts ``scripts[rid][num_context - prompt_len]``; inside the
    prompt (a chunk that is not the last) it predicts a filler word. As deterministic as greedy
    decoding, so a request run again after a lost worker predicts the same tokens. A script
    holds no stop token before ``min_new_tokens``: the sampler masks them."""

    def __init__(self, filler: int):
        self.filler = filler
        self.scripts: dict[int, list[int]] = {}
        self.prompt_lens: dict[int, int] = {}
        self.prompts: dict[int, list[int]] = {}

    def sequence(self, rid: int) -> list[int]:
        """The request's tokens by position: its prompt, then its output (the script)."""
        return self.prompts[rid] + self.scripts[rid]

    def next_token(self, rid: int, num_context: int) -> int:
        i, script = num_context - self.prompt_lens[rid], self.scripts[rid]
        return script[i] if 0 <= i < len(script) else self.filler


class ScriptedWorker:
    """What every worker shares: the parent's messages arrive in order on one pipe (``inbox``),
    its reports leave in order on the other (``outbox``) and the engine reads them when it
    likes. A dead worker's reports already written are still read (the engine drains a lost
    worker first); what it was sent is never looked at."""

    def __init__(self, pipeline: Pipeline, key: WorkerKey):
        self.key = key
        self.config = pipeline.config
        self.model = pipeline.model
        self.eos = pipeline.core.eos_token_ids
        self.writes = pipeline.check_writes  # every write into a request's blocks
        self.reads = pipeline.check_reads  # every read of a request's cached tokens
        self.seen = pipeline.seen
        self.inbox: deque = deque()
        self.outbox: deque = deque()

    def can_take(self) -> bool:
        return False

    def can_step(self) -> bool:
        return bool(self.inbox)


class ScriptedPromptWorker(ScriptedWorker):
    """``PromptWorker.run``: one ``PrefillMsg`` at a time, in order, answered by a
    ``PrefillDoneMsg`` with a first token per request (sampled after every chunk; the parent
    keeps it only after the last), or by a ``WorkerErrorMsg`` naming the whole batch. It is
    never told to stop: a batch runs to its end, and its report lets go of every request."""

    def _next_batch(self) -> m.PrefillMsg:
        msg = self.inbox.popleft()
        assert isinstance(msg, m.PrefillMsg), f"{self.key} was sent {msg}"
        for spec, block_ids, computed, chunk in zip(
            msg.requests, msg.block_ids, msg.num_computed, msg.token_ids
        ):
            self.reads(self.key, spec.request_id, block_ids, computed)
            self.writes(self.key, spec.request_id, block_ids, computed, chunk)
        return msg

    def step(self) -> None:
        msg = self._next_batch()
        first = [
            self.model.next_token(spec.request_id, computed + len(token_ids))
            for spec, token_ids, computed in zip(msg.requests, msg.token_ids, msg.num_computed)
        ]
        copies = None
        if self.config.kv_handoff == "copy":
            copies = [m.KVCopy(nbytes=64 * len(t)) for t in msg.token_ids]
        self.outbox.append(
            m.PrefillDoneMsg(
                request_ids=[spec.request_id for spec in msg.requests],
                first_tokens=first,
                published_at=time.monotonic(),
                kv_copies=copies,
                batch_tokens=sum(len(t) for t in msg.token_ids),
                compute_s=0.25,
                first_logprobs=logprobs(msg.requests, first),
            )
        )

    def fail_step(self) -> None:
        msg = self._next_batch()
        self.outbox.append(m.WorkerErrorMsg([s.request_id for s in msg.requests], "scripted"))


@dataclass
class Row:
    """A request in a worker's decode batch."""

    spec: m.RequestSpec
    block_ids: list[int]  # what it was handed, and granted since
    num_cached: int  # tokens whose K/V are in the blocks: the next input sits at this position
    num_generated: int  # as the worker counts, from its spec (a resumed request counts anew)
    next_token: int  # its next input

    def starved(self, block_size: int) -> bool:
        """Its next input has no block yet (its grant is late): it sits the step out."""
        return self.num_cached // block_size >= len(self.block_ids)


class DecodingScript(ScriptedWorker):
    """``DecodingWorker.receive``: between two steps a worker reads what has arrived, any prefix
    of its pipe. New work queues; an ``AbortMsg`` drops its requests from the queue and the
    batch and is acknowledged at once with a ``ReleasedMsg`` (also for ids it no longer has: a
    step already sent may have reported them ``finished``)."""

    def __init__(self, pipeline: Pipeline, key: WorkerKey):
        super().__init__(pipeline, key)
        self.rows: list[Row] = []
        self.queued: deque = deque()

    def can_take(self) -> bool:
        return bool(self.inbox)

    def can_step(self) -> bool:
        return any(not r.starved(BLOCK_SIZE) for r in self.rows)

    def take(self) -> None:
        msg = self.inbox.popleft()
        if isinstance(msg, m.GrantMsg):
            new = dict(zip(msg.request_ids, msg.block_ids))
            for r in self.rows:
                r.block_ids.extend(new.pop(r.spec.request_id, ()))
            for q in self.queued:
                q_blocks = q.block_ids if isinstance(q, m.HandoffMsg) else q.run.block_ids
                q_blocks.extend(new.pop(q.request.request_id, ()))
            if new:  # it let go of them meanwhile: the parent frees them with the request
                self.seen["grant for a request the worker already let go"] += 1
        elif isinstance(msg, m.AbortMsg):
            ids = set(msg.request_ids)
            self.queued = deque(q for q in self.queued if q.request.request_id not in ids)
            self.rows = [r for r in self.rows if r.spec.request_id not in ids]
            self.outbox.append(m.ReleasedMsg(sorted(ids)))
        else:
            assert isinstance(msg, self.accepts), f"{self.key} was sent {msg}"
            self.queued.append(self.queue_item(msg))

    def decode(self) -> tuple[list[m.RequestSpec], list[int], list[bool]]:
        """One token for every row; a row whose token ends it leaves the batch."""
        specs, tokens, finished = [], [], []
        ran = [r for r in self.rows if not r.starved(BLOCK_SIZE)]
        if len(ran) < len(self.rows):
            self.seen["a decode sat out a step for want of a block"] += 1
        for row in ran:
            rid = row.spec.request_id
            self.reads(self.key, rid, row.block_ids, row.num_cached)
            self.writes(self.key, rid, row.block_ids, row.num_cached, [row.next_token])
            token = self.model.next_token(rid, row.num_cached + 1)
            row.num_cached += 1
            row.num_generated += 1
            row.next_token = token
            specs.append(row.spec)
            tokens.append(token)
            finished.append(stops(row.spec, token, row.num_generated, self.eos))
        ended = {s.request_id for s, done in zip(specs, finished) if done}
        self.rows = [r for r in self.rows if r.spec.request_id not in ended]
        return specs, tokens, finished

    def report(self, specs, tokens, finished, handoff_s=None, num_prefill_tokens=0) -> None:
        ids = [s.request_id for s in specs]
        self.outbox.append(
            m.TokensMsg(
                ids,
                tokens,
                finished,
                handoff_s or {},
                step_s=0.5,
                started_at=time.monotonic(),
                num_prefill_tokens=num_prefill_tokens,
                logprobs=logprobs(specs, tokens),
            )
        )


class ScriptedTokenWorker(DecodingScript):
    """``TokenWorker.run``: a step admits queued handoffs up to ``max_num_seqs`` and decodes
    every row, reporting each token with ``finished`` from the parent's stop rule. A failed step
    names its rows (the admitted ones included) in a ``WorkerErrorMsg`` and clears them; the
    handoffs still queued stay."""

    accepts = m.HandoffMsg

    def queue_item(self, msg: m.HandoffMsg) -> m.HandoffMsg:
        return msg

    def can_step(self) -> bool:
        return super().can_step() or bool(self.queued and len(self.rows) < self.config.max_num_seqs)

    def _admit(self) -> dict[int, float]:
        handoff_s = {}
        while self.queued and len(self.rows) < self.config.max_num_seqs:
            h = self.queued.popleft()
            rid = h.request.request_id
            if h.kv_copy is not None:  # the copy handoff writes the prompt's K/V
                prompt = self.model.sequence(rid)[: h.prompt_len]
                self.writes(self.key, rid, h.block_ids, 0, prompt)
            self.rows.append(Row(h.request, h.block_ids, h.prompt_len, 1, h.first_token))
            handoff_s[rid] = 0.125
        return handoff_s

    def step(self) -> None:
        handoff_s = self._admit()
        specs, tokens, finished = self.decode()
        if specs or handoff_s:  # every row sat out: the loop goes on without a report
            self.report(specs, tokens, finished, handoff_s)

    def fail_step(self) -> None:
        self._admit()
        for row in self.rows:
            self.writes(self.key, row.spec.request_id, row.block_ids, row.num_cached, [])
        self.outbox.append(m.WorkerErrorMsg([r.spec.request_id for r in self.rows], "scripted"))
        self.rows.clear()


@dataclass
class Prefilling:
    """A colocated worker's request whose prompt is not all in its blocks yet."""

    run: m.RunMsg
    num_computed: int = 0

    @property
    def request(self) -> m.RequestSpec:
        return self.run.request

    @property
    def num_left(self) -> int:
        return len(self.run.token_ids) - self.num_computed


class ScriptedColocatedWorker(DecodingScript):
    """``ColocatedWorker.run``: a step decodes every row, then prefills chunks of the queued
    requests, first come first served, within ``max_num_batched_tokens`` (a decode takes one)
    and ``max_num_seqs``. A request whose prompt ends in the step joins the batch; a fresh one
    reports its first token in the same ``TokensMsg`` (a resumed one reports nothing: its next
    input is the token it last reported). A failed step names its rows and its queue."""

    accepts = m.RunMsg

    def queue_item(self, msg: m.RunMsg) -> Prefilling:
        return Prefilling(msg, msg.num_computed)

    def can_step(self) -> bool:
        return super().can_step() or bool(self._chunks())

    def _chunks(self) -> list[tuple[Prefilling, int]]:
        left = self.config.max_num_batched_tokens - len(self.rows)
        chunks = []
        for p in self.queued:
            if left <= 0 or len(self.rows) + len(chunks) >= self.config.max_num_seqs:
                break
            n = min(p.num_left, left)
            chunks.append((p, n))
            left -= n
        return chunks

    def step(self) -> None:
        chunks = self._chunks()
        specs, tokens, finished = self.decode()
        for p, n in chunks:
            rid, start = p.request.request_id, p.num_computed
            self.reads(self.key, rid, p.run.block_ids, start)
            chunk = p.run.token_ids[start : start + n]
            self.writes(self.key, rid, p.run.block_ids, start, chunk)
            p.num_computed += n
        for p, _ in chunks:
            if p.num_left:
                continue
            self.queued.remove(p)
            spec, run = p.request, p.run
            first = run.next_token
            if first is None:  # a fresh request: its first token is reported
                first = self.model.next_token(spec.request_id, len(run.token_ids))
                specs.append(spec)
                tokens.append(first)
                finished.append(stops(spec, first, 1, self.eos))
                if finished[-1]:
                    continue
            self.rows.append(Row(spec, run.block_ids, len(run.token_ids), 1, first))
        if specs or chunks:  # nothing ran (every row sat out): no report
            self.report(specs, tokens, finished, num_prefill_tokens=sum(n for _, n in chunks))

    def fail_step(self) -> None:
        for row in self.rows:
            self.writes(self.key, row.spec.request_id, row.block_ids, row.num_cached, [])
        ids = [r.spec.request_id for r in self.rows] + [p.request.request_id for p in self.queued]
        self.outbox.append(m.WorkerErrorMsg(ids, "scripted"))
        self.rows.clear()
        self.queued.clear()


WORKER_SCRIPTS = {
    "prompt": ScriptedPromptWorker,
    "token": ScriptedTokenWorker,
    "colocated": ScriptedColocatedWorker,
}


class Pipeline:
    """The engine thread in one process (``Engine._run``, ``_drain``, ``_on_worker_lost``): the
    core, one scripted worker per slot (None: lost, its replacement not ready yet), and what
    the outcome of every request must be."""

    def __init__(self, tokenizer, num_blocks: int = 64, **options):
        self.config = EngineConfig(**{"block_size": BLOCK_SIZE} | options)
        self.checker = PromptChecker(tokenizer, len(tokenizer), max_model_len=128)
        self.core = EngineCore(
            self.config, num_blocks, self.checker, (tokenizer.eos_token_id,),
            make_roles(self.config),
            chunked_prefill=select_handoff(self.config).allows_chunked_prefill,
        )  # fmt: skip
        self.model = ScriptedModel(filler=tokenizer(WORDS[0]).input_ids[0])
        self.seen: Counter[str] = Counter()  # the races this run went through
        self.workers: dict[WorkerKey, ScriptedWorker | None] = {
            (role, i): WORKER_SCRIPTS[role](self, (role, i))
            for role, n in workers_per_role(self.config).items()
            for i in range(n)
        }
        self.requests: list[Request] = []
        self.aborted: set[int] = set()  # cancelled by the caller
        self.must_fail: set[int] = set()  # failed by a failed step, a loss or a stopped role
        self.losses: dict[int, tuple[int, int]] = {}  # rid -> (losses in a row, output then)
        self.expected_counters = dict.fromkeys(PHASE_COUNTERS, 0.0)
        self.stopped = False  # a role stopped: the pipeline takes no new request
        self.trace: list[tuple] = []
        # the modelled K/V: per block, the token id written at each of its slots
        self.kv: dict[int, dict[int, int]] = {}

    # ------------------------------------------------------------------ the caller

    def submit(self, script: list[int], prompt=(5, 6, 7, 8, 9), **params) -> Request:
        params = SamplingParams(**{"max_new_tokens": len(script)} | params)
        req = self.core.new_request(list(prompt), params, cancel=self._cancel)
        assert len(script) == req.max_new_tokens
        self.model.scripts[req.request_id] = list(script)
        self.model.prompt_lens[req.request_id] = len(prompt)
        self.model.prompts[req.request_id] = list(prompt)
        self.requests.append(req)
        self.core.add_request(req)
        return self._done(("submit", req.request_id), req)

    def abort(self, req: Request) -> None:
        req.handle.cancel()  # calls _cancel unless the handle is done
        self._done(("cancel", req.request_id))

    def _cancel(self, rid: int) -> None:
        self.aborted.add(rid)
        req = self.core.requests[rid]
        chunked = req.num_computed_tokens and req.status is not RequestStatus.DECODING
        if chunked and not req.is_finished:
            self.seen["abort between or during the chunks of a prefill"] += 1
        self._route(self.core.abort(rid))

    # ------------------------------------------------------------------ the engine thread

    def schedule(self) -> int:
        ready: dict[str, list[int]] = {}
        for (role, index), worker in self.workers.items():
            if worker is not None:
                ready.setdefault(role, []).append(index)
        sends = self.core.schedule(ready)
        self._route(sends)
        return self._done(("schedule", len(sends)), len(sends))

    def deliver(self, key: WorkerKey) -> None:
        """The engine reads the worker's next report."""
        msg = self.workers[key].outbox.popleft()
        self._report(key, msg)
        self._done(("deliver", key, type(msg).__name__, getattr(msg, "request_ids", None)))

    def die(self, key: WorkerKey) -> None:
        """A worker dies (or hangs and is killed): what it wrote is read, then its requests run
        again; one lost too often in a row without a new token fails."""
        worker = self.workers[key]
        while worker.outbox:
            self._report(key, worker.outbox.popleft())
        requeued = []
        for req in self.core.owned_by(key):
            if req.is_finished:
                self.seen["loss with an abort outstanding"] += 1
                continue
            if req.preempting:  # only its release was outstanding: not a retry
                self.seen["loss with a preemption outstanding"] += 1
                requeued.append(req)
                continue
            in_a_row, output_then = self.losses.get(req.request_id, (0, 0))
            if req.num_output_tokens > output_then:
                in_a_row = 0
            in_a_row += 1
            if in_a_row > self.config.max_request_retries:
                self.seen["retries spent"] += 1
                self.must_fail.add(req.request_id)
            else:
                requeued.append(req)
            self.losses[req.request_id] = (in_a_row, req.num_output_tokens)
        self.core.on_worker_lost(key, "died (exit code -9)")
        self.workers[key] = None
        for req in requeued:
            assert req.status is RequestStatus.WAITING and not req.handle.done(), (
                f"request {req.request_id} is {req.status} after its worker was lost"
            )
        self._done(("die", key))

    def restart(self, key: WorkerKey) -> None:
        """The replacement sent its ReadyMsg."""
        self.workers[key] = WORKER_SCRIPTS[key[0]](self, key)
        self._done(("restart", key))

    def stop_role(self, role: str) -> None:
        """Every worker of ``role`` lost and the restart rate spent: the engine fails all."""
        for key, worker in self.workers.items():
            if key[0] == role and worker is not None:
                self.die(key)
        self.must_fail |= {r.request_id for r in self.core.requests.values() if not r.is_finished}
        self._route(self.core.fail_all(WorkerCrashedError(f"every {role} worker is lost")))
        self.stopped = True
        self._done(("stop_role", role))

    # ------------------------------------------------------------------ the workers

    def take(self, key: WorkerKey) -> None:
        worker = self.workers[key]
        aborted = getattr(worker.inbox[0], "request_ids", ())
        if key[0] == "colocated" and any(
            p.num_computed and p.request.request_id in aborted for p in worker.queued
        ):
            self.seen["colocated abort in the middle of a chunked prefill"] += 1
        worker.take()
        self._done(("take", key))

    def step(self, key: WorkerKey) -> None:
        self.workers[key].step()
        self._done(("step", key))

    def fail_step(self, key: WorkerKey) -> None:
        self.workers[key].fail_step()
        self._done(("fail_step", key))

    def settle(self) -> None:
        """Run every worker to the end, in a fixed order."""
        while True:
            for key, worker in self.workers.items():
                if worker is None:
                    self.restart(key)
                    break
                if worker.outbox:
                    self.deliver(key)
                    break
                if worker.can_take():
                    self.take(key)
                    break
                if worker.can_step():
                    self.step(key)
                    break
            else:
                if not self.schedule():
                    return

    # ------------------------------------------------------------------ routing and books

    def _route(self, sends) -> None:
        for key, msg in sends:
            assert self.workers.get(key) is not None, f"{msg} sent to {key}, which is not ready"
            self.workers[key].inbox.append(msg)

    def _report(self, key: WorkerKey, msg) -> None:
        core, c = self.core, self.expected_counters
        self._note_races(key, msg)
        if isinstance(msg, m.PrefillDoneMsg):
            c["prefill_batches"] += 1
            c["prefill_tokens"] += msg.batch_tokens
            c["prefill_s"] += msg.compute_s
        elif isinstance(msg, m.TokensMsg) and msg.num_prefill_tokens:
            c["mixed_steps"] += 1
            c["mixed_s"] += msg.step_s
            c["prefill_tokens"] += msg.num_prefill_tokens
        elif isinstance(msg, m.TokensMsg):
            c["decode_steps"] += 1
            c["decode_tokens"] += len(msg.request_ids)
            c["decode_s"] += msg.step_s
        elif isinstance(msg, m.WorkerErrorMsg):  # unfinished requests it owns fail
            for rid in msg.request_ids:
                req = core.requests.get(rid)
                if req is not None and req.owner == key and not req.is_finished:
                    self.must_fail.add(rid)
        self._route(core.on_message(key, msg))
        if key[0] == "colocated" and isinstance(msg, m.TokensMsg):
            for rid in msg.request_ids:  # a token: its prefill has ended
                req = core.requests.get(rid)
                if req is not None and req.owner == key and not req.is_finished:
                    if req.preempting:  # its token is dropped: it runs again
                        continue
                    assert req.status is RequestStatus.DECODING, (
                        f"request {rid} is {req.status} after its token"
                    )

    def _note_races(self, key: WorkerKey, msg) -> None:
        done = getattr(msg, "finished", None) or [None] * len(msg.request_ids)
        for rid, finished in zip(msg.request_ids, done):
            req = self.core.requests.get(rid)
            if req is None or req.owner != key:
                if isinstance(msg, m.ReleasedMsg):
                    self.seen["release of a request its step already let go"] += 1
                continue
            if not req.is_finished:
                continue
            name = type(msg).__name__
            if finished:
                name += " (finished)"
            self.seen[f"{name} for a request already ended"] += 1
        if isinstance(msg, m.TokensMsg) and msg.num_prefill_tokens and msg.request_ids:
            self.seen["mixed step with tokens"] += 1

    def _check_owned(self, key: WorkerKey, rid: int, block_ids: list[int]) -> None:
        req = self.core.requests.get(rid)
        assert req is not None and req.owner == key, (
            f"{key} touches the blocks {block_ids} of request {rid}, which it does not own"
        )
        assert req.block_ids[: len(block_ids)] == block_ids, (
            f"{key} holds blocks {block_ids} for request {rid}, whose table is {req.block_ids}"
        )

    def check_writes(
        self, key: WorkerKey, rid: int, block_ids: list[int], start: int, tokens: list[int]
    ) -> None:
        """``key`` writes the K/V of ``tokens`` at positions ``start..`` of request ``rid``."""
        self._check_owned(key, rid, block_ids)
        pool = self.core.pool
        for pos, token in enumerate(tokens, start):
            assert pos // BLOCK_SIZE < len(block_ids), (
                f"{key} writes position {pos} of request {rid} past its blocks {block_ids}"
            )
            block = block_ids[pos // BLOCK_SIZE]
            assert pool.block_hash[block] is None and pool.ref_counts[block] == 1, (
                f"{key} writes into block {block}, published or shared"
            )
            self.kv.setdefault(block, {})[pos % BLOCK_SIZE] = token

    def check_reads(self, key: WorkerKey, rid: int, block_ids: list[int], upto: int) -> None:
        """``key`` attends to positions ``0..upto - 1`` of request ``rid``: they must hold its
        tokens (a cached prefix another request wrote, or its own)."""
        self._check_owned(key, rid, block_ids)
        sequence = self.model.sequence(rid)
        for pos in range(upto):
            block = block_ids[pos // BLOCK_SIZE]
            found = self.kv.get(block, {}).get(pos % BLOCK_SIZE)
            assert found == sequence[pos], (
                f"{key} reads {found} at position {pos} of request {rid} (block {block}), "
                f"not its token {sequence[pos]}"
            )
        if upto and self.core.requests[rid].num_cached_tokens:
            self.seen["prefill over a cached prefix"] += 1

    def _done(self, event: tuple, result=None):
        self.trace.append(event)
        self.check_books()
        return result

    def check_books(self) -> None:
        core = self.core
        held = core.requests.values()
        refs = Counter(b for r in held if r.block_ids is not None for b in r.block_ids)
        assert all(core.pool.ref_counts[b] == n for b, n in refs.items()), "reference counts"
        assert len(refs) == core.pool.num_blocks - core.pool.num_free, "blocks leaked"
        assert len(refs) == core.pool.num_used
        for r in held:
            rid, status, owner = r.request_id, r.status, r.owner
            if owner is not None:
                assert self.workers.get(owner) is not None, f"request {rid} owned by lost {owner}"
            if r.is_finished:
                assert owner is not None, f"request {rid} finished, no worker owns it, still held"
                assert r.finish_reason is None or not r.handle.done(), (
                    f"request {rid} resolved before its blocks were freed"
                )
            elif owner is None:
                waiting = any(q is r for q in core.scheduler.waiting)
                queued = any(q is r for q in core.decode_queue) and r.handoff is not None
                assert (status is RequestStatus.WAITING and waiting) or (
                    status is RequestStatus.DECODING and queued
                ), f"request {rid} is {status} with no owner, in no queue"
            else:
                allowed = {
                    "prompt": {RequestStatus.PREFILLING},
                    "token": {RequestStatus.DECODING},
                    "colocated": {RequestStatus.PREFILLING, RequestStatus.DECODING},
                }[owner[0]]
                assert status in allowed, f"request {rid} is {status} at {owner}"
        for r in self.requests:
            if r.request_id not in core.requests:
                assert r.handle.done() and r.block_ids is None, (
                    f"request {r.request_id} dropped unresolved"
                )

    def natural_end(self, req: Request) -> tuple[list[int], str, str]:
        """What the request returns when nothing stops it early: tokens, reason, text."""
        out: list[int] = []
        for i, token in enumerate(self.model.scripts[req.request_id]):
            out.append(token)
            reason = stop_reason(
                token, i + 1, req.max_new_tokens, req.params, self.core.eos_token_ids
            )
            if reason is None and req.params.stop:
                text, matched = self.checker.apply_stop_strings(out, req.params.stop)
                if matched:
                    return out, "stop", text
            if reason is not None:
                return out, reason, self.checker.decode(out)
        raise AssertionError(f"the script of {req.request_id} never ends")

    def check_settled(self) -> None:
        core = self.core
        assert core.requests == {}, f"requests still held: {sorted(core.requests)}"
        assert core.pool.num_free == core.pool.num_blocks and not any(core.pool.ref_counts)
        assert not core.scheduler.waiting and core.busy_workers() == set()
        for req in self.requests:
            rid, natural = req.request_id, self.natural_end(req)
            try:
                out = req.handle.result(timeout=0)
                streamed = list(req.handle.stream(timeout=0))
            except SplitwiserError:
                assert rid in self.must_fail, f"request {rid} failed, but nothing failed it"
                assert req.output_token_ids == natural[0][: req.num_output_tokens]
                assert req.num_output_tokens < len(natural[0])
                continue
            assert rid not in self.must_fail, f"request {rid} ended {out.finish_reason}, not failed"
            assert out.token_ids == streamed, (
                f"request {rid} streamed {streamed}, ended {out.token_ids}"
            )
            if req.params.logprobs is not None:
                assert [lp.token_id for lp in out.logprobs] == out.token_ids
            if out.finish_reason == "stop" and out.text != self.checker.decode(out.token_ids):
                self.seen["stop string"] += 1
            if out.finish_reason == "abort":
                assert rid in self.aborted
                assert out.token_ids == natural[0][: len(out.token_ids)]
                assert len(out.token_ids) < len(natural[0])
            else:
                assert (out.token_ids, out.finish_reason, out.text) == natural
        assert core.phase_counters == pytest.approx(self.expected_counters)
        assert len(core.phase_log) == sum(
            self.expected_counters[k] for k in ("prefill_batches", "decode_steps", "mixed_steps")
        )

    def describe(self, last: int = 60) -> str:
        lines = [f"{self.config}", *map(str, self.trace[-last:])]
        return "\n".join(lines)


# ---------------------------------------------------------------------- random orders


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def random_request(
    rng: random.Random, words: list[int], eos: int, prefixes: list[list[int]]
) -> dict:
    """A request's arguments for ``Pipeline.submit``: its script honours ``min_new_tokens``;
    its prompt often starts with one of ``prefixes``, or is one of them whole."""
    max_new = rng.randint(1, 6)
    params = dict(
        min_new_tokens=rng.choice((0, 0, 0, 1, 2, 3)),
        ignore_eos=rng.random() < 0.2,
        stop=rng.choice((None, None, *STOP_STRINGS)),
        stop_token_ids=rng.choice(((), (), (words[1],))),
        logprobs=rng.choice((None, None, 0)),
    )
    stop_ids = set(params["stop_token_ids"]) | (set() if params["ignore_eos"] else {eos})
    script = []
    for i in range(max_new):
        choices = words + [eos] * 2
        if i < params["min_new_tokens"]:  # masked, as the sampler masks them
            choices = [t for t in choices if t not in stop_ids]
        script.append(rng.choice(choices))
    prompt = [rng.choice(words) for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.6:
        prompt = rng.choice(prefixes) + prompt[: rng.choice((0, 1, 3, 4, 5))]
    return dict(script=script, prompt=prompt, **params)


def random_pipeline(tokenizer, seed: int, colocated: bool) -> tuple[Pipeline, list[dict]]:
    rng = random.Random(seed)
    words = [tokenizer(w).input_ids[0] for w in WORDS]
    prefixes = [[rng.choice(words) for _ in range(rng.randint(3, 9))] for _ in range(2)]
    requests = [
        random_request(rng, words, tokenizer.eos_token_id, prefixes)
        for _ in range(rng.randint(1, 5))
    ]
    needs = [-(-(len(r["prompt"]) + len(r["script"]) - 1) // BLOCK_SIZE) for r in requests]
    # often too few for all at once: requests are preempted, or wait for blocks
    num_blocks = rng.choice(
        (max(needs), max(needs) + 1, rng.randint(max(needs), sum(needs) + 1))
    )  # fmt: skip
    options = dict(
        max_request_retries=rng.choice((0, 1, 2, 5)),
        num_lookahead_blocks=rng.choice((0, 1, 2)),
    )
    if colocated:
        max_num_seqs = rng.choice((1, 2, 3))
        options |= dict(
            colocated=True,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_seqs + rng.choice((0, 1, 2, 4, 8)),
        )
    else:
        options |= dict(
            num_prompt_workers=rng.choice((1, 2)),
            num_token_workers=rng.choice((1, 2)),
            kv_handoff=rng.choice(("shared", "shared", "copy")),
            enable_prefix_caching=rng.choice((None, None, False)),
            max_prefill_tokens=rng.choice((3, 4, 6, 10, 32)),
            max_num_seqs=rng.choice((1, 2, 4)),
        )
    return Pipeline(tokenizer, num_blocks, **options), requests


def run_random_order(sim: Pipeline, requests: list[dict], rng: random.Random) -> int:
    """Events drawn at random among those that can happen now, until nothing can; returns the
    number of events. Losses, failed steps, aborts and a stopped role come within a budget."""
    to_submit = deque(requests)
    num_deaths = rng.choice((0, 1, 2, 4))
    num_failures = rng.choice((0, 0, 1, 2))
    abort_weight = rng.choice((0.0, 0.05, 0.3))
    may_stop_role = rng.random() < 0.05
    for num_events in range(MAX_EVENTS):
        moves: list[tuple[float, tuple]] = []
        if to_submit and not sim.stopped:
            moves.append((2.0, ("submit",)))
        for key, worker in sim.workers.items():
            if worker is None:
                moves.append((1.0, ("restart", key)))
                continue
            if worker.outbox:
                moves.append((4.0, ("deliver", key)))
            if worker.can_take():
                moves.append((3.0, ("take", key)))
            if worker.can_step():
                moves.append((3.0, ("step", key)))
        if not moves:  # the engine schedules once more; if nothing goes out, it is settled
            if sim.schedule() == 0:
                return num_events
            continue
        moves.append((2.0, ("schedule",)))
        for key, worker in sim.workers.items():
            if worker is None:
                continue
            busy = key in sim.core.busy_workers()
            if num_deaths:
                moves.append((0.4 if busy else 0.05, ("die", key)))
            if num_failures and worker.can_step():
                moves.append((0.2, ("fail_step", key)))
        if abort_weight:
            for req in sim.requests:
                if not req.handle.done():
                    moves.append((abort_weight, ("abort", req)))
        if may_stop_role:
            moves.append((0.05, ("stop_role", rng.choice(list(workers_per_role(sim.config))))))
        _, (kind, *args) = rng.choices(moves, weights=[w for w, _ in moves])[0]
        if kind == "submit":
            sim.submit(**to_submit.popleft())
        elif kind == "die":
            num_deaths -= 1
            sim.die(*args)
        elif kind == "fail_step":
            num_failures -= 1
            sim.fail_step(*args)
        elif kind == "stop_role":
            may_stop_role = False
            sim.stop_role(*args)
        else:
            getattr(sim, kind)(*args)
    raise AssertionError(f"not settled after {MAX_EVENTS} events")


SPLIT_RACES = (
    "TokensMsg (finished) for a request already ended",  # abort or stop string meets its end
    "TokensMsg for a request already ended",
    "PrefillDoneMsg for a request already ended",
    "WorkerErrorMsg for a request already ended",
    "release of a request its step already let go",
    "abort between or during the chunks of a prefill",
    "loss with an abort outstanding",
    "preemption",
    "loss with a preemption outstanding",
    "a decode sat out a step for want of a block",
    "grant for a request the worker already let go",
    "prefill over a cached prefix",
    "retries spent",
    "stop string",
)
COLOCATED_RACES = (
    "TokensMsg (finished) for a request already ended",
    "TokensMsg for a request already ended",
    "WorkerErrorMsg for a request already ended",
    "release of a request its step already let go",
    "colocated abort in the middle of a chunked prefill",
    "mixed step with tokens",
    "loss with an abort outstanding",
    "preemption",
    "loss with a preemption outstanding",
    "a decode sat out a step for want of a block",
    "grant for a request the worker already let go",
    "prefill over a cached prefix",
    "retries spent",
    "stop string",
)


def explore(tokenizer, seeds: range, colocated: bool) -> tuple[int, Counter]:
    """Run one random order per seed; returns the events run and the races seen."""
    num_events, seen = 0, Counter()
    for seed in seeds:
        sim, requests = random_pipeline(tokenizer, seed, colocated)
        try:
            num_events += run_random_order(sim, requests, random.Random(seed + 1))
            sim.check_settled()
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise AssertionError(
                f"seed {seed}: {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})\n"
                f"{sim.describe()}"
            ) from exc
        seen += sim.seen
        seen["preemption"] += sim.core.num_preemptions
    return num_events, seen


@pytest.mark.parametrize(
    "colocated, num_orders, races",
    [(False, NUM_SPLIT_ORDERS, SPLIT_RACES), (True, NUM_COLOCATED_ORDERS, COLOCATED_RACES)],
    ids=["split", "colocated"],
)
def test_random_orders_settle_with_every_block_free(tokenizer, colocated, num_orders, races):
    start = time.monotonic()
    num_events, seen = explore(tokenizer, range(num_orders), colocated)
    print(f"\n{num_orders} orders, {num_events} events in {time.monotonic() - start:.1f} s")
    print("\n".join(f"{n:6d} {race}" for race, n in sorted(seen.items())))
    # the orders reach every race named, each many times (a loss while a preemption is
    # outstanding needs both at once: a few times)
    least = {race: 3 if race == "loss with a preemption outstanding" else 10 for race in races}
    assert {race: seen[race] >= least[race] for race in races} == dict.fromkeys(races, True)


# ---------------------------------------------------------------------- races written out


@pytest.fixture
def words(tokenizer) -> dict[str, int]:
    return {w: tokenizer(w).input_ids[0] for w in WORDS}


def prefill(sim: Pipeline, key: WorkerKey = P0) -> None:
    """Schedule; the prompt worker runs its next batch and its report is read."""
    sim.schedule()
    sim.step(key)
    sim.deliver(key)


def decode(sim: Pipeline, key: WorkerKey = T0) -> None:
    """Schedule; the worker reads what arrived, runs one step and its report is read."""
    sim.schedule()
    while sim.workers[key].can_take():
        sim.take(key)
    sim.step(key)
    sim.deliver(key)


def test_abort_meets_the_step_that_ended_the_request(tokenizer, words):
    a = words["a"]
    sim = Pipeline(tokenizer)
    req = sim.submit([a, a, a])
    prefill(sim)
    decode(sim)
    sim.step(T0)  # the last token: the worker lets go of the request
    sim.abort(req)  # meanwhile the caller cancels it
    assert sim.workers[T0].inbox[-1] == m.AbortMsg([req.request_id])
    sim.deliver(T0)  # finished, for a request the core already ended: the blocks go now
    assert req.handle.result(timeout=0).token_ids == [a, a]
    assert sim.core.pool.num_free == 64 and sim.core.requests == {}
    sim.take(T0)  # the worker acknowledges the abort of a request it no longer has
    sim.deliver(T0)
    assert req.handle.result(timeout=0).finish_reason == "abort"
    sim.check_settled()


def test_stop_string_meets_the_step_that_ended_the_request(tokenizer, words):
    a, b, at = words["a"], words["b"], words["at"]
    sim = Pipeline(tokenizer)
    req = sim.submit([a, b, at], stop=["ab"])
    prefill(sim)
    sim.schedule()
    sim.take(T0)
    sim.step(T0)  # "b": the stop string, which only the parent sees
    sim.step(T0)  # "at", the last token: the worker lets go
    sim.deliver(T0)
    assert sim.workers[T0].inbox[-1] == m.AbortMsg([req.request_id])
    assert not req.handle.done()  # the worker still owns the blocks
    sim.deliver(T0)  # the last step: dropped, but it let go
    out = req.handle.result(timeout=0)
    assert (out.token_ids, out.finish_reason, out.text) == ([a, b], "stop", "")
    sim.settle()
    sim.check_settled()


def test_abort_then_a_failed_step_keeps_the_abort_and_fails_the_rest(tokenizer, words):
    a = words["a"]
    sim = Pipeline(tokenizer)
    aborted, other = sim.submit([a] * 4), sim.submit([a] * 4, prompt=(1, 2, 3, 4, 5))
    prefill(sim)
    decode(sim)
    sim.abort(aborted)
    sim.fail_step(T0)  # the step fails before the worker reads the abort
    sim.deliver(T0)
    out = aborted.handle.result(timeout=0)
    assert out.finish_reason == "abort" and out.token_ids == [a, a]
    with pytest.raises(SplitwiserError, match="splitwiser-token-0: scripted"):
        other.handle.result(timeout=0)
    sim.take(T0)  # the abort's release names a request the core has forgotten
    sim.deliver(T0)
    sim.check_settled()


def test_abort_during_a_chunk_waits_for_the_batch_and_between_chunks_does_not(tokenizer, words):
    a = words["a"]
    sim = Pipeline(tokenizer, num_blocks=8, max_prefill_tokens=4)
    during = sim.submit([a, a], prompt=range(1, 11))  # 10 tokens: chunks of 4, 4 and 2
    prefill(sim)
    sim.schedule()  # its second chunk goes out
    sim.abort(during)
    assert not during.handle.done() and sim.core.pool.num_free == 5
    sim.step(P0)
    sim.deliver(P0)  # the chunk is written: the blocks go
    assert during.handle.result(timeout=0).token_ids == []
    between = sim.submit([a, a], prompt=range(1, 11))
    prefill(sim)  # its first chunk; the next waits for a batch
    sim.abort(between)
    assert between.handle.result(timeout=0).finish_reason == "abort"
    assert sim.core.pool.num_free == 8
    sim.check_settled()


def test_loss_with_an_abort_unanswered_reads_the_last_step_then_frees(tokenizer, words):
    a = words["a"]
    sim = Pipeline(tokenizer)
    req = sim.submit([a] * 4)
    prefill(sim)
    decode(sim)
    sim.step(T0)  # a third token, written before the worker dies
    sim.abort(req)
    sim.die(T0)  # its report is read (the token dropped), then the blocks go
    out = req.handle.result(timeout=0)
    assert out.finish_reason == "abort" and out.token_ids == [a, a]
    assert sim.core.num_retried == 0
    sim.restart(T0)
    sim.check_settled()


def test_retries_count_losses_in_a_row_without_a_new_token(tokenizer, words):
    a, b, at, c = (words[w] for w in WORDS)
    sim = Pipeline(tokenizer, max_request_retries=1)
    req = sim.submit([a, b, at, c, a])
    prefill(sim)
    decode(sim)
    sim.die(T0)  # lost once: runs again from its output so far
    sim.restart(T0)
    sim.schedule()
    again = sim.workers[P0].inbox[0]  # the prompt's first block is cached: not again
    assert again.token_ids == [[9, a]] and again.num_computed == [4]
    sim.step(P0)
    sim.deliver(P0)
    decode(sim)  # "at": a new token
    sim.die(T0)  # lost again, but after progress: runs again
    sim.restart(T0)
    prefill(sim)
    sim.schedule()
    assert sim.workers[T0].inbox[0].first_token == at
    sim.die(T0)  # lost again without a new token: its retries are spent
    with pytest.raises(WorkerCrashedError, match="run again 1 times in a row"):
        req.handle.result(timeout=0)
    assert req.output_token_ids == [a, b, at] and sim.core.num_retried == 2
    sim.restart(T0)
    sim.check_settled()


def counted(sim: Pipeline, *names: str) -> tuple[float, ...]:
    return tuple(sim.core.phase_counters[name] for name in names)


def colocated(tokenizer, **options) -> Pipeline:
    options = {"max_num_seqs": 2, "max_num_batched_tokens": 4} | options
    return Pipeline(tokenizer, colocated=True, **options)


def test_colocated_abort_in_the_middle_of_a_chunked_prefill(tokenizer, words):
    a = words["a"]
    sim = colocated(tokenizer)
    req = sim.submit([a, a], prompt=range(1, 11))  # 10 tokens: chunks of 4, 4 and 2
    decode(sim, C0)  # the first chunk: a mixed step with no token
    sim.step(C0)  # the second chunk
    sim.abort(req)
    sim.deliver(C0)
    assert not req.handle.done()  # the worker still owns the blocks
    sim.take(C0)
    sim.deliver(C0)  # its release
    assert req.handle.result(timeout=0).token_ids == []
    assert counted(sim, "mixed_steps", "prefill_tokens", "decode_steps") == (2, 8, 0)
    sim.check_settled()


def test_colocated_mixed_steps_count_prompt_tokens_and_start_decoding_in_place(tokenizer, words):
    a, b = words["a"], words["b"]
    sim = colocated(tokenizer)
    first = sim.submit([a] * 4, prompt=[1, 2, 3])
    second = sim.submit([b] * 2, prompt=range(1, 7))
    decode(sim, C0)  # 3 prompt tokens of the first, 1 of the second; the first's first token
    assert first.status is RequestStatus.DECODING and first.output_token_ids == [a]
    assert second.status is RequestStatus.PREFILLING and second.output_token_ids == []
    decode(sim, C0)  # the first decodes beside 3 prompt tokens of the second
    decode(sim, C0)  # the first decodes beside the last 2, and the second's first token
    assert second.status is RequestStatus.DECODING and second.output_token_ids == [b]
    assert counted(sim, "mixed_steps", "prefill_tokens", "decode_steps") == (3, 9, 0)
    decode(sim, C0)  # decode only: the first's last token and the second's
    assert counted(sim, "mixed_steps", "decode_steps", "decode_tokens") == (3, 1, 2)
    sim.check_settled()


def test_colocated_loss_runs_again_from_the_start_then_resumes_decoding(tokenizer, words):
    a, b, at, c = (words[w] for w in WORDS)
    sim = colocated(tokenizer)
    req = sim.submit([a, b, at, c], prompt=range(1, 11))
    decode(sim, C0)  # the first chunk
    sim.die(C0)  # the chunk it was writing may be half written: from the start again
    sim.restart(C0)
    sim.schedule()
    assert sim.workers[C0].inbox[0].token_ids == list(range(1, 11))
    for _ in range(4):  # three chunks, the last with the first token, then one decode
        decode(sim, C0)
    assert req.output_token_ids == [a, b]
    sim.die(C0)
    sim.restart(C0)
    sim.schedule()
    run = sim.workers[C0].inbox[0]
    assert run.token_ids == [*range(1, 11), a] and run.next_token == b
    sim.settle()
    assert req.handle.result(timeout=0).token_ids == [a, b, at, c]
    sim.check_settled()


def test_a_prefix_being_prefilled_is_waited_for_not_computed_twice(tokenizer, words):
    a, b = words["a"], words["b"]
    sim = Pipeline(tokenizer, num_prompt_workers=2)
    first = sim.submit([a, a], prompt=range(1, 11))  # 10 tokens: 2 full blocks
    second = sim.submit([b, b], prompt=[*range(1, 11), 3])  # the same 2 blocks, then its own
    other = sim.submit([a], prompt=[7, 7, 7])
    sim.schedule()
    # the second is passed over while the first prefills its blocks; the third goes ahead
    (batch,) = sim.workers[P0].inbox
    assert [r.request_id for r in batch.requests] == [first.request_id, other.request_id]
    assert not sim.workers[("prompt", 1)].inbox
    assert second.block_ids is None and sim.core.scheduler.waiting[0] is second
    sim.step(P0)
    sim.deliver(P0)  # the first's blocks are published
    sim.schedule()
    (again,) = sim.workers[P0].inbox
    assert again.requests[0].request_id == second.request_id
    assert again.num_computed == [8] and again.token_ids == [[9, 10, 3]]
    sim.settle()
    assert second.handle.result(timeout=0).token_ids == [b, b]
    assert second.num_cached_tokens == 8
    sim.check_settled()
