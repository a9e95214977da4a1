"""The KV block pool's bookkeeping: one record per block, kept in the parent only (one owner, no
races between workers), with reference counts and the prefix cache.

A block is *in use* while some request's block table holds it (``ref_count > 0``) and *free*
otherwise. Free blocks wait in one LRU list; a free block that still holds a full, published
block of some request's tokens stays *cached*: its hash maps to it, a later request with the same
prefix takes it back (``touch``), and it is evicted (its hash dropped) only when the block is
handed out again. The hash of block ``i`` chains on block ``i - 1``'s, so a hit on a block means
the whole prefix before it matched too (vLLM v1's design).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    salt: str | None = None,
    known: list[int] | None = None,
) -> list[int]:
    """The chained hash of every full block of ``token_ids``; ``known``: hashes already computed
    for its leading blocks (extended in place and returned). ``salt`` enters the first block's
    hash: requests with different salts never share a block."""
    hashes = known if known is not None else []
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else hash(("splitwiser", salt))
        hashes.append(hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))))
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # free blocks, least recently used first: new blocks come from the head
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> the block holding it
        self.num_cached_free = 0  # free blocks that still hold a cached block

    # ------------------------------------------------------------------ counts

    @property
    def num_free(self) -> int:
        """Blocks not in use, cached ones included (they are evicted when needed)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    # ------------------------------------------------------------------ allocation

    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` blocks from the LRU head, each with a reference count of 1; a cached
        one loses its hash here (lazy eviction)."""
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        ids = []
        for _ in range(num_blocks):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            ids.append(block)
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """A request lets go of its blocks: each one's count drops; at 0 it goes to the LRU tail
        (cached ones stay findable). Pass a request's blocks tail first: its last blocks are
        the least likely to be shared, so they are evicted first."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed twice or never allocated")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None
                if self.block_hash[b] is not None:
                    self.num_cached_free += 1

    # ------------------------------------------------------------------ the prefix cache

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The blocks holding the longest run of leading ``hashes`` (not touched yet)."""
        hit = []
        if self.enable_caching:
            for h in hashes:
                block = self._cached.get(h)
                if block is None:
                    break
                hit.append(block)
        return hit

    def touch(self, block_ids: Sequence[int]) -> None:
        """A request takes cached blocks into its table: a free one leaves the free list."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self._free[b]
                self.num_cached_free -= 1
            self.ref_counts[b] += 1

    def publish(self, block_id: int, block_hash: int) -> None:
        """``block_id`` is full and its K/V are written (its writer reported the step done):
        later requests may reuse it. If another block already holds the same hash, that one
        stays the cached copy and this block is freed with its request as any other."""
        if not self.enable_caching or block_hash in self._cached:
            return
        assert self.ref_counts[block_id] > 0 and self.block_hash[block_id] is None
        self.block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id

    def reset(self) -> bool:
        """Forget every cached block (benchmarks that must start cold). False, and nothing
        done, while any block is in use, as vLLM's ``reset_prefix_cache``: a running request's
        blocks must stay what the map says."""
        if self.num_used:
            return False
        for b in self._cached.values():
            self.block_hash[b] = None
        self._cached.clear()
        self.num_cached_free = 0
        return True

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            del self._cached[h]
            self.num_cached_free -= 1
