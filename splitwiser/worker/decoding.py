"""What every worker with a persistent decode batch does between its steps (token workers and
colocated workers): take the parent's messages, drop aborted requests, and keep ``rows`` in step
with the batch's rows."""

from __future__ import annotations

import queue
from collections import deque

from splitwiser.core import messages as m
from splitwiser.worker.context import WorkerParts, get_msg
from splitwiser.worker.decode_batch import DecodeBatch


class DecodingWorker:
    """``self.rows[i]`` is the request in the batch's row ``i`` (it has ``.spec``);
    ``self.queued`` holds work waiting to join (each item has ``.request``, its spec)."""

    accepts: type  # the parent's message of new work, queued as ``self.queue(msg)``

    def __init__(self, parts: WorkerParts):
        self.cfg, self.runner, self.kv_pool = parts.cfg, parts.runner, parts.kv_pool
        self.in_conn, self.out_conn, self.device = parts.in_conn, parts.out_conn, parts.device
        self.batch: DecodeBatch = parts.batch
        self.handoff = parts.handoff
        self.rows: list = []
        self.queued: deque = deque()
        self.eos = parts.cfg.eos_token_ids

    def queue(self, msg) -> None:
        self.queued.append(msg)

    def receive(self, block: bool) -> bool:
        """Drain the incoming messages; True when asked to shut down."""
        while True:
            try:
                msg = get_msg(self.in_conn, block)
            except queue.Empty:
                return False
            block = False
            if isinstance(msg, m.ShutdownMsg):
                return True
            if isinstance(msg, self.accepts):
                self.queue(msg)
            elif isinstance(msg, m.AbortMsg):
                self.abort(msg.request_ids)

    def abort(self, request_ids: list[int]) -> None:
        ids = set(request_ids)
        self.queued = deque(q for q in self.queued if q.request.request_id not in ids)
        for row in reversed(range(len(self.rows))):
            if self.rows[row].spec.request_id in ids:
                self.remove(row)
        # NOTE: acknowledged at once: this worker no longer touches their blocks
        self.out_conn.send(m.ReleasedMsg(sorted(ids)))

    def remove(self, row: int) -> None:
        moved = self.batch.remove(row)
        last = self.rows.pop()
        if moved is not None:
            self.rows[row] = last
