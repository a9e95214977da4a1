"""The KV block allocator. It lives in the parent only: one allocator, no races between workers."""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(num_blocks)]
        self._used.update(ids)
        return ids

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if b not in self._used:
                raise RuntimeError(f"block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)
