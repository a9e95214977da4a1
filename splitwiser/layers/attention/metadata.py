"""What one forward pass's attention reads and writes: ``AttentionMetadata`` (where the batch's
tokens and their K/V live in the block pool) and ``write_kv`` (the new tokens' K/V into it),
shared by every attention backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where one forward pass's tokens live. Tensors are on the model's device; the ``max_*`` and
    ``num_*`` fields are host integers.

    - ``is_prefill``: whole prompts, nothing cached: ``query_starts``, ``max_query_len`` and
      ``padded_index`` describe them, attention runs over their fresh K/V.
    - decode (``is_prefill`` false, ``query_starts`` None): one token per request, row ``i`` of
      ``block_table`` and ``context_lens`` being token ``i``'s request.
    - mixed (``is_prefill`` false, ``query_starts`` set): each request's tokens are a chunk at
      positions ``context_len - query_len .. context_len - 1``; the first ``num_decodes``
      requests have one token each (decode tokens), the rest are prefill chunks, and
      ``max_query_len``, ``padded_index`` and ``max_chunk_context_len`` describe those chunks.
    """

    is_prefill: bool
    # [layers, 2 (key, value), slots, kv_heads, head_dim]: the shared pool or a staging buffer
    kv_cache: torch.Tensor
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] long: the pool slot each new token's K/V goes to
    # prefill and mixed: [num_reqs + 1] long, offset of each request's tokens in the packed batch
    query_starts: torch.Tensor | None = None
    max_query_len: int = 0  # the longest prompt (prefill) or prefill chunk (mixed)
    # [num_padded_tokens] long, each token's row in the padded batch ``[num_padded_reqs *
    # max_query_len]`` that one SDPA call runs over: prefill with several prompts (every
    # token), mixed (the chunks' tokens, counted from the first chunk's)
    padded_index: torch.Tensor | None = None
    # decode and mixed: [num_reqs, max_blocks] int32, each request's blocks in order
    block_table: torch.Tensor | None = None
    # decode and mixed: [num_reqs] int32, each request's cached tokens plus its new ones
    context_lens: torch.Tensor | None = None
    # decode: the longest context of the batch (mixed: of its decode tokens), or None when
    # unknown (CUDA graphs: the kernel reads each request's length on the device)
    max_context_len: int | None = None
    num_decodes: int = 0  # mixed: the one-token requests, which come first
    max_chunk_context_len: int = 0  # mixed: the longest context of its prefill chunks
    # mixed: every prefill chunk starts its prompt (nothing of it cached), so each chunk attends
    # to itself alone, causally
    chunks_start_prompts: bool = False


def write_kv(meta: AttentionMetadata, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """``key``/``value``: [num_tokens, kv_heads, head_dim], written at ``meta.slot_mapping``."""
    meta.kv_cache[layer, 0].index_copy_(0, meta.slot_mapping, key)
    meta.kv_cache[layer, 1].index_copy_(0, meta.slot_mapping, value)


def kv_blocks(meta: AttentionMetadata, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's keys and values as [num_blocks, block_size, kv_heads, head_dim] views."""
    kv = meta.kv_cache[layer]
    shape = (-1, meta.block_size, *kv.shape[2:])
    return kv[0].view(shape), kv[1].view(shape)
