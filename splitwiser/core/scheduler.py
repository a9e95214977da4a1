"""Parent-side scheduling: FCFS prefill batches under a token budget.

Pure logic, no processes: the engine feeds it requests and worker loads and sends what it returns.
Blocks for a request's whole lifetime (prompt + all new tokens) are reserved at admission, so a
running request never waits for memory and nothing is ever preempted.
"""

from __future__ import annotations

from collections import deque

from splitwiser.core.request import Request
from splitwiser.kv.block_allocator import BlockAllocator


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_prefill_tokens: int,
        max_batches_per_prompt_worker: int = 2,
        chunked: bool = True,
    ):
        self.allocator = allocator
        self.block_size = block_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_batches_per_prompt_worker = max_batches_per_prompt_worker
        self.chunked = chunked  # a prompt over max_prefill_tokens is prefilled in chunks
        self.waiting: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def requeue_front(self, reqs: list[Request]) -> None:
        """Put requests back at the head (the worker running them died); they keep their
        blocks. A request that was decoding is prefilled again with what it generated so far."""
        for req in reversed(reqs):
            req.requeue()
            self.waiting.appendleft(req)

    def remove(self, req: Request) -> None:
        """Take a waiting request out of the queue (aborted or failed before its prefill)."""
        if req in self.waiting:
            self.waiting.remove(req)

    def _admit(self, req: Request) -> bool:
        if req.block_ids is not None:
            return True
        num_blocks = req.num_blocks_needed(self.block_size)
        if not self.allocator.can_allocate(num_blocks):
            return False
        req.block_ids = self.allocator.allocate(num_blocks)
        return True

    def admit_next(self) -> Request | None:
        """The head of the queue with its blocks reserved, or None (empty, or the pool full)."""
        if not self.waiting or not self._admit(self.waiting[0]):
            return None
        return self.waiting.popleft()

    def continue_prefill(self, req: Request) -> None:
        """A chunked prefill goes on: its next chunk first, before anything newer."""
        self.waiting.appendleft(req)

    def next_prefill_batch(self) -> list[tuple[Request, int]]:
        """FCFS: the head of the queue, then as many followers as the budget and the pool
        allow: ``[(request, tokens to prefill)]``. With ``chunked`` the last one takes what is
        left of the budget (its next chunk follows in a later batch); without, a prompt over
        the budget runs whole, alone."""
        batch: list[tuple[Request, int]] = []
        num_tokens = 0
        while self.waiting:
            req = self.waiting[0]
            left, room = req.num_prefill_left, self.max_prefill_tokens - num_tokens
            if room <= 0 or (left > room and batch and not self.chunked):
                break
            n = min(left, room) if self.chunked else left
            if not self._admit(req):
                break
            self.waiting.popleft()
            batch.append((req, n))
            num_tokens += n
        return batch

    def schedule(
        self, prompt_worker_loads: dict[int, int]
    ) -> list[tuple[int, list[tuple[Request, int]]]]:
        """Batches for the prompt workers with room, least loaded first: ``[(worker, batch)]``.
        ``prompt_worker_loads``: each ready prompt worker's batches in flight."""
        out = []
        for worker in sorted(prompt_worker_loads, key=prompt_worker_loads.get):
            if prompt_worker_loads[worker] >= self.max_batches_per_prompt_worker:
                continue
            batch = self.next_prefill_batch()
            if not batch:
                break
            out.append((worker, batch))
        return out

    def free(self, req: Request) -> None:
        if req.block_ids is not None:
            self.allocator.free(req.block_ids)
            req.block_ids = None
