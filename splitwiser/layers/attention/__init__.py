"""Paged attention: the one implementation both model front-ends call, one call per layer.

- Prefill: causal attention of packed prompts over their own fresh K/V (``prefill_attention``),
  when no request of the batch has anything cached yet.
- Paged: query tokens over their requests' K/V in the pool, read through the block table
  (``decode_attention``). Decode is one query token per request: GQA query heads share their
  K/V head, nothing is repeated in memory, and the cost follows each request's live tokens. On
  CUDA a Triton kernel reads the blocks in place; elsewhere a gather of the batch's live blocks
  feeds a grouped matmul. A mixed batch (vLLM v1's step: running decodes plus prefill chunks
  whose prompt prefix is already cached) runs in the same call: its decode tokens as above, its
  chunks causally over their cached prefix and themselves (``chunked_attention``).
- ``write_kv`` puts the new tokens' K/V at their slots in the pool before either.

Splitwiser's own model code (``splitwiser.models``) calls these directly; any other Hugging Face
architecture reaches the same functions through ``AttentionInterface`` (``hf_attention_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from splitwiser.layers.attention import cpu_paged, triton_paged

ATTN_IMPLEMENTATION = "splitwiser_paged"


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


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of every packed prompt over itself: q [T, heads, D], k/v [T, kv_heads, D]
    -> [T, heads, D]. Several prompts are laid out right-padded in one batch: with a causal mask
    a real token only sees earlier tokens of its own prompt, never the padding after it, so one
    SDPA call computes exactly each prompt's own attention."""
    num_reqs = meta.query_starts.numel() - 1
    if num_reqs == 1:
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, h, T, D]
        return _sdpa(q, k, v, scale)[0].transpose(0, 1)
    length, idx = meta.max_query_len, meta.padded_index

    def pad(x: torch.Tensor) -> torch.Tensor:  # [T, h, D] -> [B, h, L, D]
        padded = x.new_zeros((num_reqs * length, *x.shape[1:])).index_copy_(0, idx, x)
        return padded.view(num_reqs, length, *x.shape[1:]).transpose(1, 2)

    out = _sdpa(pad(q), pad(k), pad(v), scale)  # [B, heads, L, D]
    return out.transpose(1, 2).reshape(num_reqs * length, *q.shape[1:]).index_select(0, idx)


def _sdpa(q, k, v, scale):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


def decode_attention(
    q: torch.Tensor, meta: AttentionMetadata, layer: int, scale: float
) -> torch.Tensor:
    """Query tokens over their requests' cached K/V (the new tokens' included, see
    ``write_kv``): q [num_tokens, heads, D] -> [num_tokens, heads, D]. Decode: one token per
    request; a mixed batch: its decode tokens here, its prefill chunks in ``chunked_attention``."""
    if meta.query_starts is not None:
        return _mixed_attention(q, meta, layer, scale)
    k_cache, v_cache = _blocks(meta, layer)
    if q.is_cuda and triton_paged.AVAILABLE:
        return triton_paged.paged_decode(
            q, k_cache, v_cache, meta.block_table, meta.context_lens, scale
        )
    if cpu_paged.supports(q, k_cache):  # reads the blocks in place, as the Triton kernel
        return cpu_paged.paged_decode(
            q, k_cache, v_cache, meta.block_table, meta.context_lens, scale
        )
    return _gathered_decode(q, k_cache, v_cache, meta, scale)


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


def chunked_attention(
    q: torch.Tensor, meta: AttentionMetadata, layer: int, scale: float
) -> torch.Tensor:
    """The prefill chunks of a mixed batch, requests ``num_decodes..`` of ``meta``: each chunk's
    queries over its request's cached prefix and the chunk itself, causally (a query at position
    ``p`` sees its request's keys at positions ``<= p``): q [chunk_tokens, heads, D] -> same.

    The chunks' blocks, up to the longest chunk context, are gathered into one padded batch and
    one SDPA call runs over it with that mask, on every device. NOTE: on CUDA this is a first
    version; a varlen paged kernel (Triton or FlashInfer) that reads the blocks in place is to be
    chosen by a spike on a GPU (``bench/README.md``)."""
    first = meta.num_decodes
    k_cache, v_cache = _blocks(meta, layer)
    num_chunks = meta.context_lens.shape[0] - first
    num_heads, head_dim = q.shape[1:]
    num_blocks = -(-meta.max_chunk_context_len // meta.block_size)
    table = meta.block_table[first:, :num_blocks]
    k, v = _gather(k_cache, table), _gather(v_cache, table)  # [C, kv_heads, L, D]
    length = meta.max_query_len
    padded = q.new_zeros((num_chunks * length, num_heads, head_dim))
    padded = padded.index_copy_(0, meta.padded_index, q).view(num_chunks, length, num_heads, -1)
    if meta.chunks_start_prompts:
        # query i sees keys 0..i: SDPA's own causal mask, no mask tensor to build (CPU, 8 x 256
        # tokens: 5.9 against 6.6 ms a layer with the explicit mask, bench/README.md)
        out = _sdpa(padded.transpose(1, 2), k[:, :, :length], v[:, :, :length], scale)
        return _padded_rows(out, meta.padded_index)
    starts = meta.query_starts[first:]
    num_cached = meta.context_lens[first:] - (starts[1:] - starts[:-1])  # [C]
    # each padded query row's position in its request; padding rows see some keys too (no row
    # is fully masked) and are dropped
    positions = num_cached[:, None] + torch.arange(length, device=q.device)  # [C, Lq]
    keys = torch.arange(k.shape[2], device=q.device)
    visible = keys[None, None, :] <= positions[:, :, None]  # [C, Lq, L]
    # NOTE: enable_gqa, not _gathered_decode's grouped queries: with hundreds of queries per
    # request the CPU's flash kernel ran 1.2x faster this way (bench/README.md)
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2), k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=True
    )  # [C, heads, Lq, D]
    return _padded_rows(out, meta.padded_index)


def _padded_rows(out: torch.Tensor, padded_index: torch.Tensor) -> torch.Tensor:
    """The real tokens' rows of a padded batch's output [C, heads, Lq, D] -> [T, heads, D]."""
    num_chunks, num_heads, length, head_dim = out.shape
    out = out.transpose(1, 2).reshape(num_chunks * length, num_heads, head_dim)
    return out.index_select(0, padded_index)


def _blocks(meta: AttentionMetadata, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's keys and values as [num_blocks, block_size, kv_heads, head_dim] views."""
    kv = meta.kv_cache[layer]
    shape = (-1, meta.block_size, *kv.shape[2:])
    return kv[0].view(shape), kv[1].view(shape)


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The blocks of ``table`` [B, n] from ``cache`` [num_blocks, block_size, kv_heads, D],
    each row's in order: [B, kv_heads, n * block_size, D]."""
    num_reqs, num_blocks = table.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    # NOTE: blocks as rows of a 2-D view: index_select copies whole rows (fast on CPU)
    rows = cache.flatten(1).index_select(0, table.flatten())
    shape = (num_reqs, num_blocks * block_size, num_kv_heads, head_dim)
    return rows.view(shape).transpose(1, 2)


def _gathered_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """Decode attention in plain torch: the batch's live blocks gathered (whole blocks, up to
    the longest context) into one padded batch, then one SDPA call with the padding masked.
    The query heads that share a K/V head go in as that head's queries (``[B, kv_heads, group,
    D]``): each K/V head is read once for its whole group, nothing is repeated, and the CPU's
    flash kernel runs 1.2-2.5x faster than with one query per head and ``enable_gqa``
    (``bench/README.md``)."""
    num_reqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    max_len = meta.max_context_len
    if max_len is None:  # every block of the table (CUDA graphs without Triton)
        max_len = meta.block_table.shape[1] * meta.block_size
    num_blocks = -(-max_len // meta.block_size)
    table = meta.block_table[:, :num_blocks]
    k, v = _gather(k_cache, table), _gather(v_cache, table)  # [B, kvh, L, D]
    live = torch.arange(k.shape[2], device=q.device) < meta.context_lens[:, None]  # [B, L]
    grouped = q.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=live[:, None, None], scale=scale)
    return out.view(num_reqs, num_heads, head_dim)


def hf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, num_tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_metadata: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The same attention for a Hugging Face model's own modules (``AttentionInterface``): its
    forward runs on the packed batch ``[1, num_tokens]`` with ``attn_metadata`` passed through."""
    meta = attn_metadata
    if meta is None:
        raise RuntimeError("splitwiser paged attention called without attention metadata")
    scale = module.head_dim**-0.5 if scaling is None else scaling
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, h, D]
    write_kv(meta, module.layer_idx, k, v)
    if meta.is_prefill:
        out = prefill_attention(q, k, v, meta, scale)
    else:
        out = decode_attention(q, meta, module.layer_idx, scale)
    return out[None], None  # [1, num_tokens, heads, head_dim]


AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention_forward)
