"""Parent-side scheduling: FCFS prefill batches under a token budget, and admission.

Pure logic, no processes: the engine feeds it requests and worker loads and sends what it returns.
A request is admitted with blocks for what its prefill writes plus its first decode's token,
minus the longest prefix already cached (those blocks are shared, not prefilled again); its
decode gets further blocks as it goes (``EngineCore.grant_blocks``). A small watermark of free
blocks keeps admissions from taking what running requests are about to need.
"""

from __future__ import annotations

from collections import deque

from splitwiser.core.request import Request
from splitwiser.kv.block_pool import BlockPool, block_hashes

WATERMARK = 0.01  # of the pool, kept free at admission while other requests run (vLLM's)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_prefill_tokens: int,
        max_batches_per_prompt_worker: int = 2,
        chunked: bool = True,
    ):
        self.pool = pool
        self.watermark_blocks = int(WATERMARK * pool.num_blocks)
        # prompt tokens looked up in the prefix cache at admission, and found there
        self.prefix_queries = self.prefix_hits = 0
        # full blocks being prefilled, not published yet: hash -> the request computing it. A
        # request whose prefix continues with one of them waits for it instead of computing
        # it again (vLLM shares such blocks within a step; across processes, publication waits
        # for the writer's report)
        self.pending: dict[int, Request] = {}
        self.block_size = block_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_batches_per_prompt_worker = max_batches_per_prompt_worker
        self.chunked = chunked  # a prompt over max_prefill_tokens is prefilled in chunks
        # prompt workers running a batch at once (None: all of them); phase control sets it,
        # and max_prefill_tokens, between ticks
        self.prefill_concurrency: int | None = None
        self.waiting: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def requeue_front(self, reqs: list[Request]) -> None:
        """Put requests back at the head (their worker died, or they were preempted), their
        blocks freed: each is prefilled again with what it generated so far, from the longest
        prefix the cache still holds (its own published blocks, usually)."""
        # NOTE: behind the requests at the head that hold blocks (a prefill between its
        # chunks): they go first, or the head could wait forever for the blocks they hold
        for req in reqs:
            self.free(req)
            req.requeue()
        self._put_back(reqs)

    def _put_back(self, reqs: list[Request]) -> None:
        """``reqs``, in order, at the head of the queue but behind the requests there that
        hold blocks (a prefill between its chunks, or one admitted before a budget ran out)."""
        admitted = 0
        while admitted < len(self.waiting) and self.waiting[admitted].block_ids is not None:
            admitted += 1
        for req in reversed(reqs):
            self.waiting.insert(admitted, req)

    def remove(self, req: Request) -> None:
        """Take a waiting request out of the queue (aborted or failed before its prefill)."""
        if req in self.waiting:
            self.waiting.remove(req)

    def hashes(self, req: Request, num_tokens: int) -> list[int]:
        """The chained hashes of the full blocks of ``req``'s first ``num_tokens`` tokens."""
        n = num_tokens // self.block_size
        if len(req.block_hashes) < n:
            tokens = req.all_token_ids[: n * self.block_size]
            block_hashes(tokens, self.block_size, req.params.cache_salt, req.block_hashes)
        return req.block_hashes[:n]

    def cached_prefix(self, req: Request) -> tuple[list[int], list[int]]:
        """``req``'s prefill's full-block hashes that may hit (the last prefill token is always
        computed: its logits give the next token), and the cached blocks of the longest run of
        them."""
        hashes = self.hashes(req, req.num_prefill_tokens - 1)
        return hashes, self.pool.lookup(hashes)

    def _admit(self, req: Request, others_running: bool = True) -> bool:
        """Blocks for ``req``'s prefill and its first decode token, its cached prefix shared:
        False (nothing taken) when the pool cannot give them with the watermark kept free."""
        if req.block_ids is not None:
            return True
        num_prefill = req.num_prefill_tokens
        _, hit = self.cached_prefix(req)
        num_tokens = min(num_prefill + 1, req.max_num_tokens)
        num_new = -(-num_tokens // self.block_size) - len(hit)
        num_taken = num_new + sum(self.pool.ref_counts[b] == 0 for b in hit)
        reserve = self.watermark_blocks if others_running else 0
        if not self.pool.can_allocate(num_taken + reserve):
            return False
        self.pool.touch(hit)
        req.block_ids = hit + self.pool.allocate(num_new)
        if self.pool.enable_caching:
            for h in self.hashes(req, num_prefill)[len(hit) :]:
                self.pending.setdefault(h, req)
        req.num_published_blocks = len(hit)
        req.num_computed_tokens = len(hit) * self.block_size
        self.prefix_queries += num_prefill
        self.prefix_hits += req.num_computed_tokens
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.num_computed_tokens
        return True

    def admit_next(self, others_running: bool = True) -> Request | None:
        """The head of the queue with its blocks taken, or None (empty, or the pool full).
        ``others_running``: False when nothing else holds blocks (no watermark then: a request
        that fits the pool alone always runs)."""
        passed, admitted = [], None
        while self.waiting and admitted is None:
            req = self.waiting[0]
            if self.waits_for_prefix(req):
                passed.append(self.waiting.popleft())
            elif self._admit(req, others_running):
                admitted = self.waiting.popleft()
            else:
                break
        self._put_back(passed)
        return admitted

    def waits_for_prefix(self, req: Request) -> bool:
        """Its prefix goes on with a block another request is prefilling now: better to wait
        for that block's publication than to compute it again."""
        if req.block_ids is not None or not self.pool.enable_caching:
            return False
        hashes, hit = self.cached_prefix(req)
        num_hit = len(hit)
        if num_hit == len(hashes):
            return False
        writer = self.pending.get(hashes[num_hit])
        if writer is None:
            return False
        if writer.block_ids is None or writer.is_finished:  # it will not publish it
            del self.pending[hashes[num_hit]]
            return False
        return writer is not req

    def published(self, block_hash: int) -> None:
        self.pending.pop(block_hash, None)

    def continue_prefill(self, req: Request) -> None:
        """A chunked prefill goes on: its next chunk first, before anything newer."""
        self.waiting.appendleft(req)

    def next_prefill_batch(
        self, others_running: bool = True, share: int | None = None
    ) -> list[tuple[Request, int]]:
        """FCFS: the head of the queue, then as many followers as the budget and the pool
        allow: ``[(request, tokens to prefill)]``. With ``chunked`` the last one takes what is
        left of the budget (its next chunk follows in a later batch); without, a prompt over
        the budget runs whole, alone. ``share``: no follower is added once the batch holds
        that many tokens (the budget still bounds it; no prompt is cut for the share)."""
        batch: list[tuple[Request, int]] = []
        num_tokens, passed = 0, []
        while self.waiting:
            req, room = self.waiting[0], self.max_prefill_tokens - num_tokens
            if room <= 0 or (share is not None and num_tokens >= share):
                break
            if self.waits_for_prefix(req):  # passed over until its prefix is published
                passed.append(self.waiting.popleft())
                continue
            # admitted first: a cached prefix shortens what is left to prefill
            if not self._admit(req, others_running or bool(batch)):
                break
            left = req.num_prefill_left
            if left > room and batch and not self.chunked:
                break  # it waits at the head, its blocks taken
            n = min(left, room) if self.chunked else left
            self.waiting.popleft()
            batch.append((req, n))
            num_tokens += n
        self._put_back(passed)
        return batch

    def schedule(
        self, prompt_worker_loads: dict[int, int], others_running: bool = True
    ) -> list[tuple[int, list[tuple[Request, int]]]]:
        """Batches for the prompt workers with room, least loaded first: ``[(worker, batch)]``.
        ``prompt_worker_loads``: each ready prompt worker's batches in flight. An idle worker
        gets one only while fewer than ``prefill_concurrency`` workers are busy (a busy one may
        queue its next batch: that adds no concurrency)."""
        out = []
        workers = [w for w in sorted(prompt_worker_loads, key=prompt_worker_loads.get)
                   if prompt_worker_loads[w] < self.max_batches_per_prompt_worker]  # fmt: skip
        if self.prefill_concurrency is not None:
            busy = sum(n > 0 for n in prompt_worker_loads.values())
            idle_workers = [w for w in workers if prompt_worker_loads[w] == 0]
            allowed = set(idle_workers[: max(0, self.prefill_concurrency - busy)])
            workers = [w for w in workers if prompt_worker_loads[w] > 0 or w in allowed]
        # NOTE: what waits is dealt out among the idle workers, not one batch filled to the
        # budget while another worker has nothing (a few prompts after a shared prefix)
        idle = sum(prompt_worker_loads[w] == 0 for w in workers)
        share = -(-self._tokens_waiting() // idle) if idle > 1 else None
        for worker in workers:
            batch = self.next_prefill_batch(others_running or bool(out), share)
            if not batch:
                break
            out.append((worker, batch))
        return out

    def _tokens_waiting(self) -> int:
        """Prefill tokens the queue holds, less what the prefix cache holds of them (bounded:
        the budgets of a few batches is all a share needs to know)."""
        total, bound = 0, 2 * self.max_prefill_tokens * self.max_batches_per_prompt_worker
        for req in self.waiting:
            if req.block_ids is not None:
                total += req.num_prefill_left
            else:
                _, hit = self.cached_prefix(req)
                total += req.num_prefill_tokens - len(hit) * self.block_size
            if total >= bound:
                break
        return total

    def free(self, req: Request) -> None:
        """Its blocks go back, tail first (the least likely to be shared are evicted first);
        published ones stay cached."""
        if req.block_ids is not None:
            self.pool.free(req.block_ids[::-1])
            req.block_ids = None
            for h in req.block_hashes:  # what it was to publish and will not
                if self.pending.get(h) is req:
                    del self.pending[h]
