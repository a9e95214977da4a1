"""Paged attention: the one implementation both model front-ends call, one call per layer.

- Prefill: causal attention of packed prompts over their own fresh K/V (``prefill_attention``),
  when no request of the batch has anything cached yet.
- Paged: query tokens over their requests' K/V in the pool, read through the block table
  (``decode_attention``). Decode is one query token per request: GQA query heads share their
  K/V head, nothing is repeated in memory, and the cost follows each request's live tokens. It
  runs on the first backend of ``DECODE_BACKENDS`` that takes the batch (``select``): on CUDA a
  Triton kernel reads the blocks in place, on the CPU a C kernel does, elsewhere a gather of the
  batch's live blocks feeds a grouped matmul. A mixed batch (vLLM v1's step: running decodes
  plus prefill chunks whose prompt prefix is already cached) runs in the same call: its decode
  tokens as above, its chunks causally over their cached prefix and themselves
  (``chunked_attention``).
- ``write_kv`` puts the new tokens' K/V at their slots in the pool before either.

Splitwiser's own model code (``splitwiser.models``) calls these directly; any other Hugging Face
architecture reaches the same functions through ``AttentionInterface`` (``hf.py``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from splitwiser.layers.attention import cpu_paged, sdpa, triton_paged
from splitwiser.layers.attention.backend import AttentionBackend
from splitwiser.layers.attention.metadata import AttentionMetadata, kv_blocks, write_kv
from splitwiser.layers.attention.sdpa import chunked_attention, prefill_attention

__all__ = [
    "DECODE_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "chunked_attention",
    "decode_attention",
    "kv_blocks",
    "prefill_attention",
    "select",
    "write_kv",
]

# Decode backends, first choice first; the last one runs any batch.
DECODE_BACKENDS: tuple[AttentionBackend, ...] = (triton_paged, cpu_paged, sdpa)


def select(q: torch.Tensor, k_cache: torch.Tensor) -> AttentionBackend:
    """The first decode backend that runs this batch (``AttentionBackend.supports``)."""
    return next(backend for backend in DECODE_BACKENDS if backend.supports(q, k_cache))


def decode_attention(
    q: torch.Tensor, meta: AttentionMetadata, layer: int, scale: float
) -> torch.Tensor:
    """Query tokens over their requests' cached K/V (the new tokens' included, see
    ``write_kv``): q [num_tokens, heads, D] -> [num_tokens, heads, D]. Decode: one token per
    request; a mixed batch: its decode tokens here, its prefill chunks in ``chunked_attention``."""
    if meta.query_starts is not None:
        return _mixed_attention(q, meta, layer, scale)
    k_cache, v_cache = kv_blocks(meta, layer)
    return select(q, k_cache).paged_decode(
        q, k_cache, v_cache, meta.block_table, meta.context_lens, scale, meta.max_context_len
    )


def _mixed_attention(q, meta: AttentionMetadata, layer: int, scale: float) -> torch.Tensor:
    """A mixed batch: its decode tokens (first) as a decode batch, then its prefill chunks."""
    num_decodes = meta.num_decodes
    if num_decodes == 0:
        return chunked_attention(q, meta, layer, scale)
    decodes = replace(
        meta,
        query_starts=None,
        block_table=meta.block_table[:num_decodes],
        context_lens=meta.context_lens[:num_decodes],
    )
    if num_decodes == meta.context_lens.shape[0]:
        return decode_attention(q, decodes, layer, scale)
    return torch.cat([
        decode_attention(q[:num_decodes], decodes, layer, scale),
        chunked_attention(q[num_decodes:], meta, layer, scale),
    ])  # fmt: skip
