"""The token worker's persistent decode batch: preallocated device tensors, one row per running
request, changed only when a request is admitted or finishes.

Rows ``[0, num_rows)`` are the running requests, packed: a finished request's row is filled
with the last row. Every row past them is a *scratch row*: its block table points at the pool's
scratch block and its position is 0, so a batch padded to a CUDA-graph size writes its padding
K/V there and attends over one token, never touching a request's blocks.
"""

from __future__ import annotations

import torch


class DecodeBatch:
    def __init__(
        self, max_num_seqs: int, max_blocks_per_seq: int, scratch_block: int, device: torch.device
    ):
        self.device = device
        self.scratch_block = scratch_block
        self.input_ids = torch.zeros(max_num_seqs, dtype=torch.long, device=device)  # [S]
        # the position of each row's input token == the number of tokens already cached
        self.positions = torch.zeros(max_num_seqs, dtype=torch.long, device=device)  # [S]
        self.block_table = torch.full(
            (max_num_seqs, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device
        )  # [S, max_blocks]
        self.host_positions: list[int] = []  # the same positions, known without a sync

    @property
    def num_rows(self) -> int:
        return len(self.host_positions)

    @property
    def max_context_len(self) -> int:
        return max(self.host_positions) + 1

    def add(self, block_ids: list[int], num_cached: int, token: int) -> int:
        """A request joins: its blocks, its cached length and its next input token."""
        row = self.num_rows
        n = len(block_ids)
        self.block_table[row, :n] = torch.tensor(block_ids, dtype=torch.int32).to(self.device)
        self.positions[row] = num_cached
        self.input_ids[row] = token
        self.host_positions.append(num_cached)
        return row

    def extend(self, row: int, start: int, block_ids: list[int]) -> None:
        """``row``'s request was granted more blocks: entries ``start..`` of its table."""
        blocks = torch.tensor(block_ids, dtype=torch.int32).to(self.device)
        self.block_table[row, start : start + len(block_ids)] = blocks

    def remove(self, row: int) -> int | None:
        """Drop ``row``; the last row moves into it. Returns the row that moved there, if any."""
        last = self.num_rows - 1
        moved = None
        if row != last:
            self.block_table[row] = self.block_table[last]
            self.positions[row] = self.positions[last]
            self.input_ids[row] = self.input_ids[last]
            self.host_positions[row] = self.host_positions[last]
            moved = last
        self.block_table[last] = self.scratch_block
        self.positions[last] = 0
        self.host_positions.pop()
        return moved

    def clear(self) -> None:
        self.block_table.fill_(self.scratch_block)
        self.positions.zero_()
        self.host_positions.clear()

    def advance(self, next_tokens: torch.Tensor) -> None:
        """After a step: each row's sampled token is its next input, one position further."""
        n = self.num_rows
        self.input_ids[:n] = next_tokens
        self.positions[:n] += 1
        self.host_positions = [p + 1 for p in self.host_positions]
