"""Replay one workload through one system, honouring the arrival schedule.

Every system gets the same prompt token ids, the same forced output lengths (``ignore_eos``)
and the same schedule; latencies count from the scheduled arrival (see ``metrics``).

- ``replay_submit`` (Splitwiser, colocated, the vLLM systems, OpenAI-compatible endpoints):
  each request is submitted at its arrival time; the runtime batches on its own.
- ``replay_sequential``: requests in arrival order, each alone once the previous one finished.
- ``replay_batched``: when idle, up to ``batch_size`` requests that have arrived form one
  static batch (or the next arrival alone when none is waiting).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from splitwiser.benchmark.metrics import RequestRecord
from splitwiser.benchmark.workloads import BenchRequest
from splitwiser.errors import SplitwiserError
from splitwiser.outputs import RequestOutput
from splitwiser.sampling import SamplingParams

Progress = Callable[[int], None]  # called with the number of requests just finished


def _params(req: BenchRequest) -> SamplingParams:
    return SamplingParams(max_new_tokens=req.output_len, ignore_eos=True)


def _wait_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _record(system, req, t0, submit, out: RequestOutput | None, error=None) -> RequestRecord:
    rec = RequestRecord(
        system, req.request_id, req.arrival_s, req.prompt_len, req.output_len, submit - t0
    )
    if error is not None:
        rec.error = f"{type(error).__name__}: {error}"
    if out is not None:
        m = out.metrics
        rec.token_times_s = [t - t0 for t in m.token_times]
        rec.finish_s = None if m.finish_time is None else m.finish_time - t0
        rec.token_ids = list(out.token_ids)
        rec.handoff_s = m.handoff_s
        rec.kv_bytes_copied = m.kv_bytes_copied
    return rec


def replay_submit(pipe, requests, prompts, progress: Progress, system: str) -> tuple[list, float]:
    """Submit at arrival times (``pipe.submit``); a side thread reports completions as they
    happen. ``system``: the name in the records."""
    t0 = time.monotonic()
    submitted: list = []
    stop = threading.Event()

    def watch() -> None:
        reported = 0
        while True:
            stopping = stop.wait(0.1)
            done = sum(h is None or h.done() for _, _, h, _ in list(submitted))
            if done > reported:
                progress(done - reported)
                reported = done
            if stopping:
                break

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for req, ids in zip(requests, prompts):
            _wait_until(t0 + req.arrival_s)
            submit = time.monotonic()
            try:
                submitted.append((req, submit, pipe.submit(ids, _params(req)), None))
            except SplitwiserError as exc:
                submitted.append((req, submit, None, exc))
        records = []
        for req, submit, handle, error in submitted:
            out = None
            if handle is not None:
                try:
                    out = handle.result()
                except SplitwiserError as exc:
                    error = exc
            records.append(_record(system, req, t0, submit, out, error))
    finally:
        stop.set()
        watcher.join()
    return records, _end(records, t0)


def replay_sequential(
    pipe, requests, prompts, progress: Progress, system: str
) -> tuple[list, float]:
    t0 = time.monotonic()
    records = []
    for req, ids in zip(requests, prompts):
        _wait_until(t0 + req.arrival_s)
        submit = time.monotonic()
        try:
            out, error = pipe.generate([ids], _params(req))[0], None
        except SplitwiserError as exc:
            out, error = None, exc
        records.append(_record(system, req, t0, submit, out, error))
        progress(1)
    return records, _end(records, t0)


def replay_batched(pipe, requests, prompts, progress: Progress, system: str) -> tuple[list, float]:
    t0 = time.monotonic()
    pending = deque(zip(requests, prompts))
    records = []
    while pending:
        _wait_until(t0 + pending[0][0].arrival_s)
        now = time.monotonic() - t0
        batch = []
        while pending and len(batch) < pipe.batch_size and pending[0][0].arrival_s <= now:
            batch.append(pending.popleft())
        submit = time.monotonic()
        try:
            outs = pipe.generate_batch([ids for _, ids in batch], [_params(r) for r, _ in batch])
            errors = [None] * len(batch)
        except SplitwiserError as exc:
            outs, errors = [None] * len(batch), [exc] * len(batch)
        for (req, _), out, error in zip(batch, outs, errors):
            records.append(_record(system, req, t0, submit, out, error))
        progress(len(batch))
    return records, _end(records, t0)


def _end(records: list[RequestRecord], t0: float) -> float:
    """The run's duration: its start to the last request's end (or now, if none finished)."""
    ends = [r.finish_s for r in records if r.finish_s is not None]
    return max(ends) if ends else time.monotonic() - t0
