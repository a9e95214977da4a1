"""What every worker with a persistent decode batch does between its steps (token workers and
colocated workers): take the parent's messages, drop aborted requests, add granted blocks, and
keep ``rows`` in step with the batch's rows.

Blocks come ahead of need (``GrantMsg``, see ``EngineCore.grant_blocks``), so the step loop never
waits for the parent. If a grant is ever late, the request whose next token has no block sits out
(``park``): it leaves the batch, the others decode, and it rejoins at the step boundary after its
grant arrives.
"""

from __future__ import annotations

import queue
from collections import deque

from splitwiser.core import messages as m
from splitwiser.worker.context import WorkerParts, get_msg
from splitwiser.worker.decode_batch import DecodeBatch


class DecodingWorker:
    """``self.rows[i]`` is the request in the batch's row ``i`` (it has ``.spec``,
    ``.block_ids`` and ``.next_token``); ``self.queued`` holds work waiting to join (each item
    has ``.request``, its spec, and ``.block_ids``); ``self.parked``: requests sitting out for
    want of a block, each with its position."""

    accepts: type  # the parent's message of new work, queued as ``self.queue(msg)``

    def __init__(self, parts: WorkerParts):
        self.cfg, self.runner, self.kv_pool = parts.cfg, parts.runner, parts.kv_pool
        self.in_conn, self.out_conn, self.device = parts.in_conn, parts.out_conn, parts.device
        self.batch: DecodeBatch = parts.batch
        self.handoff = parts.handoff
        self.rows: list = []
        self.queued: deque = deque()
        self.parked: list[tuple[object, int]] = []
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
            elif isinstance(msg, m.GrantMsg):
                self.grant(msg)
            elif isinstance(msg, m.AbortMsg):
                self.abort(msg.request_ids)

    def grant(self, msg: m.GrantMsg) -> None:
        new = dict(zip(msg.request_ids, msg.block_ids))
        for row, r in enumerate(self.rows):
            blocks = new.pop(r.spec.request_id, None)
            if blocks is not None:
                self.batch.extend(row, len(r.block_ids), blocks)
                r.block_ids.extend(blocks)
        for r, _ in self.parked:
            r.block_ids.extend(new.pop(r.spec.request_id, ()))
        for q in self.queued:  # granted before it joined the batch
            q.block_ids.extend(new.pop(q.request.request_id, ()))
        self.unpark()

    def park_starved(self) -> None:
        """Rows whose next input has no block yet leave the batch until their grant comes."""
        block_size = self.cfg.block_size
        for row in reversed(range(len(self.rows))):
            r, pos = self.rows[row], self.batch.host_positions[row]
            if pos // block_size >= len(r.block_ids):
                self.parked.append((r, pos))
                self.remove(row)

    def unpark(self) -> None:
        block_size = self.cfg.block_size
        still = []
        for r, pos in self.parked:
            if pos // block_size < len(r.block_ids):  # (it kept its place in max_num_seqs)
                self.batch.add(r.block_ids, pos, r.next_token)
                self.rows.append(r)
            else:
                still.append((r, pos))
        self.parked = still

    def abort(self, request_ids: list[int]) -> None:
        ids = set(request_ids)
        self.queued = deque(q for q in self.queued if q.request.request_id not in ids)
        self.parked = [(r, pos) for r, pos in self.parked if r.spec.request_id not in ids]
        for row in reversed(range(len(self.rows))):
            if self.rows[row].spec.request_id in ids:
                self.remove(row)
        # NOTE: acknowledged at once: this worker no longer touches their blocks
        self.out_conn.send(m.ReleasedMsg(sorted(ids)))

    @property
    def idle(self) -> bool:
        """Nothing to run until a message comes: no row in the batch, and nothing queued that
        could join it (requests sitting out wait for their grants)."""
        return not self.rows and (not self.queued or self.num_running >= self.cfg.max_num_seqs)

    @property
    def num_running(self) -> int:
        """Requests in the batch or sitting out: what ``max_num_seqs`` bounds."""
        return len(self.rows) + len(self.parked)

    def remove(self, row: int) -> None:
        moved = self.batch.remove(row)
        last = self.rows.pop()
        if moved is not None:
            self.rows[row] = last
