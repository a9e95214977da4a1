"""Replay one workload through one system, as its clients would send it.

Every system gets the same prompt token ids, the same forced output lengths (``ignore_eos``)
and the same schedule; latencies count from the scheduled arrival (see ``metrics``).

- A conversation's later turn (``multi-turn``) falls due only once the previous turn's answer
  arrived, plus its think time; its prompt is the previous prompt, that answer's token ids and
  its new message (``Schedule``). A turn whose previous one failed is not sent (it fails too).
- A request asking for more tokens than the workload's output length (``--max-tokens-factor``)
  is cancelled by the client once it received that length, as a user closing the stream; only
  those tokens count, and the request ended for the client at the last of them.

- ``replay_submit`` (Splitwiser, colocated, the vLLM systems, OpenAI-compatible endpoints):
  each request is submitted when due; the runtime batches on its own. One thread drives it,
  woken by the next due time or by a request's events (``RequestHandle.subscribe``).
- ``replay_sequential``: requests in order of falling due, each alone once the previous one
  finished.
- ``replay_batched``: when idle, up to ``batch_size`` requests that are due form one static
  batch (or the next due request alone when none is waiting).

``generate()`` reserves nothing for ``max_new_tokens`` and has no client to cut it, so the
sequential and batched baselines ask for the output length itself.
"""

from __future__ import annotations

import heapq
import queue
import time
from collections.abc import Callable
from dataclasses import replace

from splitwiser.benchmark.metrics import RequestRecord
from splitwiser.benchmark.multi_turn import follow_up_prompt
from splitwiser.benchmark.workloads import BenchRequest
from splitwiser.errors import SplitwiserError
from splitwiser.outputs import RequestOutput
from splitwiser.sampling import SamplingParams

Progress = Callable[[int], None]  # called with the number of requests just finished


class PreviousTurnFailed(SplitwiserError):
    """A conversation's turn was not sent: the turn before it failed."""


def _params(req: BenchRequest, asked: bool = True) -> SamplingParams:
    """``asked``: the tokens the request asks for; else its output length (generate())."""
    max_tokens = req.num_asked_tokens if asked else req.output_len
    return SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)


def _wait_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class Schedule:
    """The requests of one replay in the order they fall due, in seconds after its start:
    independent requests and first turns at their ``arrival_s``; a later turn once
    ``finished`` was told the previous turn's answer, ``think_s`` after it."""

    def __init__(self, requests: list[BenchRequest], prompts: list[list[int]]):
        self._due: list = []  # heap of (due_s, request_id, request, prompt ids)
        self._next_turn: dict[int, tuple[BenchRequest, list[int]]] = {}  # by previous turn id
        last_turn: dict[int, BenchRequest] = {}  # by conversation
        for req, ids in zip(requests, prompts):
            if req.is_follow_up:
                before = last_turn.get(req.conversation)
                if before is None or before.turn != req.turn - 1:
                    raise ValueError(f"request {req.request_id}: turn {req.turn} of conversation "
                                     f"{req.conversation} without the turn before it")  # fmt: skip
                self._next_turn[before.request_id] = (req, ids)
            else:
                heapq.heappush(self._due, (req.arrival_s, req.request_id, req, list(ids)))
            if req.conversation is not None:
                last_turn[req.conversation] = req

    def __bool__(self) -> bool:
        """Requests left to send (due, or waiting for the answer before them)."""
        return bool(self._due or self._next_turn)

    def next_due_s(self) -> float | None:
        """When the next request falls due; None while every one left waits for an answer."""
        return self._due[0][0] if self._due else None

    def pop(self, now_s: float, limit: int | None = None) -> list[tuple[BenchRequest, list]]:
        """The requests due by ``now_s`` (at most ``limit``), earliest first, each with its
        ``arrival_s`` the time it fell due, and its prompt."""
        out = []
        while self._due and self._due[0][0] <= now_s and (limit is None or len(out) < limit):
            due_s, _, req, ids = heapq.heappop(self._due)
            out.append((replace(req, arrival_s=due_s), ids))
        return out

    def finished(self, record: RequestRecord, prompt: list[int]) -> list[RequestRecord]:
        """``record``'s request ended: its conversation's next turn falls due ``think_s`` after
        the answer, or, if it failed, the conversation's remaining turns fail (returned)."""
        following = self._next_turn.pop(record.request_id, None)
        if following is None:
            return []
        req, message = following
        if record.ok and len(record.token_ids) == record.output_len:
            ids = follow_up_prompt([*prompt, *record.token_ids], message)
            due_s = record.finish_s + req.think_s
            heapq.heappush(self._due, (due_s, req.request_id, req, ids))
            return []
        dropped = RequestRecord(record.system, req.request_id, record.finish_s or 0.0,
                                req.prompt_len, req.output_len)  # fmt: skip
        dropped.error = f"{PreviousTurnFailed.__name__}: turn {req.turn - 1} failed"
        return [dropped, *self.finished(dropped, [])]


def _record(system, req, t0, submit, out: RequestOutput | None, error=None) -> RequestRecord:
    """The request as its client saw it: at most ``output_len`` tokens (a client that asked for
    more stopped there, so the request ended at the last of them)."""
    rec = RequestRecord(
        system, req.request_id, req.arrival_s, req.prompt_len, req.output_len, submit - t0
    )
    if error is not None:
        rec.error = f"{type(error).__name__}: {error}"
    if out is not None:
        m, n = out.metrics, req.output_len
        rec.token_times_s = [t - t0 for t in m.token_times[:n]]
        rec.token_ids = list(out.token_ids[:n])
        if req.num_asked_tokens > n and len(m.token_times) >= n:
            rec.finish_s = rec.token_times_s[-1]
        else:
            rec.finish_s = None if m.finish_time is None else m.finish_time - t0
        rec.handoff_s = m.handoff_s
        rec.kv_bytes_copied = m.kv_bytes_copied
    return rec


def _listener(req: BenchRequest, events: queue.SimpleQueue):
    """Hands a request's events to the replay's thread: ``"enough"`` once it has the output
    length it wants (only where it asked for more), ``"end"`` when it finished or failed."""
    num_tokens = 0
    wants_cut = req.num_asked_tokens > req.output_len

    def listen(token, logprobs, output, error) -> None:  # under the handle's lock: no blocking
        nonlocal num_tokens
        if token is not None:
            num_tokens += 1
            if wants_cut and num_tokens == req.output_len:
                events.put(("enough", req.request_id))
        elif output is not None or error is not None:
            events.put(("end", req.request_id))

    return listen


def replay_submit(pipe, requests, prompts, progress: Progress, system: str) -> tuple[list, float]:
    """Submit each request when due (``pipe.submit``); a request's end may make its
    conversation's next turn due. ``system``: the name in the records."""
    t0 = time.monotonic()
    schedule = Schedule(requests, prompts)
    events: queue.SimpleQueue = queue.SimpleQueue()
    live: dict[int, tuple] = {}  # request id -> (request, prompt, submit time, handle)
    records: list[RequestRecord] = []

    def end(req, ids, submit, out, error) -> None:
        rec = _record(system, req, t0, submit, out, error)
        dropped = schedule.finished(rec, ids)
        records.extend([rec, *dropped])
        progress(1 + len(dropped))

    while schedule or live:
        # 1) send what is due
        for req, ids in schedule.pop(time.monotonic() - t0):
            submit = time.monotonic()
            try:
                handle = pipe.submit(ids, _params(req))
            except SplitwiserError as exc:
                end(req, ids, submit, None, exc)
                continue
            live[req.request_id] = (req, ids, submit, handle)
            handle.subscribe(_listener(req, events))
        # 2) wait for the next due time or a request's event
        due = schedule.next_due_s()
        timeout = None if due is None else max(0.0, t0 + due - time.monotonic())
        if not live and due is None:
            break
        try:
            kind, request_id = events.get(timeout=timeout)
        except queue.Empty:
            continue
        # 3) act on it: a client with enough tokens cancels; an ended request is recorded
        req, ids, submit, handle = live[request_id]
        if kind == "enough":
            handle.cancel()
            continue
        del live[request_id]
        try:
            end(req, ids, submit, handle.result(), None)
        except SplitwiserError as exc:
            end(req, ids, submit, None, exc)
    return records, _end(records, t0)


def replay_sequential(
    pipe, requests, prompts, progress: Progress, system: str
) -> tuple[list, float]:
    t0 = time.monotonic()
    schedule = Schedule(requests, prompts)
    records = []
    while schedule:
        _wait_until(t0 + schedule.next_due_s())
        [(req, ids)] = schedule.pop(time.monotonic() - t0, limit=1)
        submit = time.monotonic()
        try:
            out, error = pipe.generate([ids], _params(req, asked=False))[0], None
        except SplitwiserError as exc:
            out, error = None, exc
        rec = _record(system, req, t0, submit, out, error)
        dropped = schedule.finished(rec, ids)
        records += [rec, *dropped]
        progress(1 + len(dropped))
    return records, _end(records, t0)


def replay_batched(pipe, requests, prompts, progress: Progress, system: str) -> tuple[list, float]:
    t0 = time.monotonic()
    schedule = Schedule(requests, prompts)
    records = []
    while schedule:
        _wait_until(t0 + schedule.next_due_s())
        batch = schedule.pop(time.monotonic() - t0, limit=pipe.batch_size)
        submit = time.monotonic()
        params = [_params(r, asked=False) for r, _ in batch]
        try:
            outs = pipe.generate_batch([ids for _, ids in batch], params)
            errors = [None] * len(batch)
        except SplitwiserError as exc:
            outs, errors = [None] * len(batch), [exc] * len(batch)
        for (req, ids), out, error in zip(batch, outs, errors):
            rec = _record(system, req, t0, submit, out, error)
            dropped = schedule.finished(rec, ids)
            records += [rec, *dropped]
            progress(1 + len(dropped))
    return records, _end(records, t0)


def _end(records: list[RequestRecord], t0: float) -> float:
    """The run's duration: its start to the last request's end (or now, if none finished)."""
    ends = [r.finish_s for r in records if r.finish_s is not None]
    return max(ends) if ends else time.monotonic() - t0
