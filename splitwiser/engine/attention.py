"""Paged attention for Hugging Face models: registered with transformers' ``AttentionInterface``.

The model's own modules compute everything (projections, RoPE, norms, MLP); only attention is ours.
Each forward packs several requests into one row (``[1, total_tokens]``). Attention writes the new
tokens' K/V into the pool at their slots, then attends per request:
- prefill: over the request's fresh K/V (exactly what ``generate()`` attends over);
- decode: over the request's own slots gathered from the pool, so the cost follows live tokens.
Per request it calls transformers' own SDPA function: the arithmetic ``generate()`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from splitwiser.engine.kv_pool import gather_kv

ATTN_IMPLEMENTATION = "splitwiser_paged"


@dataclass
class PagedBatch:
    """Attention metadata of one packed forward pass."""

    is_prefill: bool
    # [layers, 2, slots, kv_heads, head_dim]: the shared pool or a staging buffer
    kv_pool: torch.Tensor
    slot_mapping: torch.Tensor  # [total_tokens] long: where each new token's K/V is written
    query_starts: list[int]  # offset of each request's tokens in the packed row; len = num_reqs + 1
    context_slots: list[torch.Tensor] | None = None  # per-request decode: each one's slots
    # padded decode: every request's slots padded to the longest context ([B, max_len] long;
    # padding points into its last block or block 0: masked, and finite since the pool starts
    # zeroed) and which are real ([B, 1, 1, max_len] bool)
    padded_slots: torch.Tensor | None = None
    padded_mask: torch.Tensor | None = None


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, total_tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, total_tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_batch: PagedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    batch = paged_batch
    if batch is None:
        raise RuntimeError("splitwiser paged attention called without a PagedBatch")
    layer = module.layer_idx
    # 1) write the new tokens' K/V into their slots: [total_tokens, kv_heads, head_dim]
    batch.kv_pool[layer, 0].index_copy_(0, batch.slot_mapping, key[0].transpose(0, 1))
    batch.kv_pool[layer, 1].index_copy_(0, batch.slot_mapping, value[0].transpose(0, 1))
    if batch.padded_slots is not None:
        return _padded_decode(module, query, batch, layer, dropout, scaling)
    # 2) attend per request
    outputs = []
    starts = batch.query_starts
    for i in range(len(starts) - 1):
        q = query[:, :, starts[i] : starts[i + 1]]
        if batch.is_prefill:
            k = key[:, :, starts[i] : starts[i + 1]]
            v = value[:, :, starts[i] : starts[i + 1]]
        else:
            # [2, 1, kv_heads, len, head_dim]: the layout generate()'s cache hands to SDPA
            k, v = gather_kv(batch.kv_pool, layer, batch.context_slots[i]).unsqueeze(1).unbind(0)
        out, _ = sdpa_attention_forward(
            module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=None
        )
        outputs.append(out)  # [1, q_len, heads, head_dim]
    return torch.cat(outputs, dim=1), None


def _padded_decode(module, query, batch: PagedBatch, layer: int, dropout, scaling):
    """Decode in one SDPA call per layer: every request's K/V gathered into a batch padded to
    the longest context, the padding masked out. Few kernels (what a GPU wants); the sums may
    round differently from ``generate()``'s unpadded ones in the last bits."""
    num_reqs, max_len = batch.padded_slots.shape
    pool = batch.kv_pool[layer]  # [2, slots, kv_heads, head_dim]
    kv = pool.index_select(1, batch.padded_slots.flatten())  # [2, B * max_len, kv_heads, hd]
    k, v = kv.view(2, num_reqs, max_len, *pool.shape[2:]).transpose(2, 3).unbind(0)
    q = query[0].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
    out, _ = sdpa_attention_forward(
        module, q, k, v, batch.padded_mask, dropout=dropout, scaling=scaling, is_causal=None
    )  # [B, 1, heads, head_dim]
    return out.transpose(0, 1), None  # [1, B, heads, head_dim]: one token per request


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
