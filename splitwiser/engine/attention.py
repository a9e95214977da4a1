"""Paged attention: the one implementation both model front-ends call, one call per layer.

- Prefill: causal attention of packed prompts over their own fresh K/V (``prefill_attention``).
- Decode: one query token per request over its blocks in the pool, read through the block
  table (``decode_attention``): GQA query heads share their K/V head, nothing is repeated in
  memory, and the cost follows each request's live tokens. On CUDA a Triton kernel reads the
  blocks in place; elsewhere a gather of the batch's live blocks feeds a grouped matmul.
- ``write_kv`` puts the new tokens' K/V at their slots in the pool before either.

Splitwiser's own model code (``splitwiser.models``) calls these directly; any other Hugging Face
architecture reaches the same functions through ``AttentionInterface`` (``hf_attention_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from splitwiser.engine import triton_attention

ATTN_IMPLEMENTATION = "splitwiser_paged"


@dataclass
class AttentionMetadata:
    """Where one forward pass's tokens live. Prefill packs whole prompts; decode packs one token
    per request. Tensors are on the model's device; the ``max_*`` fields are host integers."""

    is_prefill: bool
    # [layers, 2 (key, value), slots, kv_heads, head_dim]: the shared pool or a staging buffer
    kv_cache: torch.Tensor
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] long: the pool slot each new token's K/V goes to
    # prefill: [num_reqs + 1] long, offset of each request's tokens in the packed batch
    query_starts: torch.Tensor | None = None
    max_query_len: int = 0
    # prefill with several requests: [num_tokens] long, each token's row in the padded batch
    # ``[num_reqs * max_query_len]`` that one causal SDPA call runs over
    padded_index: torch.Tensor | None = None
    # decode: [num_reqs, max_blocks] int32, each request's blocks in order
    block_table: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None  # decode: [num_reqs] int32, new token included
    # decode: the longest context of the batch, or None when unknown (CUDA graphs: the kernel
    # reads each request's length on the device)
    max_context_len: int | None = None


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
    """One query token per request over its cached K/V (its new token's included, see
    ``write_kv``): q [B, heads, D] -> [B, heads, D]."""
    k_cache, v_cache = _blocks(meta, layer)
    if q.is_cuda and triton_attention.AVAILABLE:
        return triton_attention.paged_decode(
            q, k_cache, v_cache, meta.block_table, meta.context_lens, scale
        )
    return _gathered_decode(q, k_cache, v_cache, meta, scale)


def _blocks(meta: AttentionMetadata, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's keys and values as [num_blocks, block_size, kv_heads, head_dim] views."""
    kv = meta.kv_cache[layer]
    shape = (-1, meta.block_size, *kv.shape[2:])
    return kv[0].view(shape), kv[1].view(shape)


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
    flat = meta.block_table[:, :num_blocks].flatten()  # [B * n]
    length = num_blocks * meta.block_size
    shape = (num_reqs, length, num_kv_heads, head_dim)
    # NOTE: blocks as rows of a 2-D view: index_select copies whole rows (fast on CPU)
    k = k_cache.flatten(1).index_select(0, flat).view(shape).transpose(1, 2)  # [B, kvh, L, D]
    v = v_cache.flatten(1).index_select(0, flat).view(shape).transpose(1, 2)
    live = torch.arange(length, device=q.device) < meta.context_lens[:, None]  # [B, L]
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
