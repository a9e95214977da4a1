"""The interface of a paged decode attention backend.

Decode is the phase whose best kernel depends on the device: each backend is one module of this
package that defines the two functions below, and ``DECODE_BACKENDS`` in ``__init__.py`` lists
them in priority order. Prefill and the prefill chunks of a mixed batch have one implementation
on every device (SDPA, ``sdpa.py``), so they are not part of it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionBackend(Protocol):
    """A module that runs decode attention over the block pool."""

    def supports(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether it runs this batch (its device, dtype and layout): ``q`` [T, heads, D],
        ``k_cache`` one layer's keys [num_blocks, block_size, kv_heads, D]."""
        ...

    def paged_decode(
        self,
        q: torch.Tensor,  # [T, heads, D], one query token per request
        k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D], one layer's keys
        v_cache: torch.Tensor,  # same, its values
        block_table: torch.Tensor,  # [T, max_blocks] int32, each request's blocks in order
        context_lens: torch.Tensor,  # [T] int32, >= 1, each request's live tokens
        scale: float,
        max_context_len: int | None = None,
    ) -> torch.Tensor:
        """Each query token over its request's first ``context_lens[i]`` keys:
        ``softmax(q k^T * scale) v`` -> [T, heads, D]. ``max_context_len`` is the longest
        context of the batch, or None when only the device knows it (CUDA graphs); the kernels
        that read each request's length themselves ignore it."""
        ...
