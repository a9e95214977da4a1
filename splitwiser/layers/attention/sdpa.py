"""Attention in plain torch (``F.scaled_dot_product_attention``), on every device.

- ``prefill_attention``: packed whole prompts, causally over their own fresh K/V.
- ``chunked_attention``: the prefill chunks of a mixed batch over their cached prefix and
  themselves, gathered from the pool.
- ``paged_decode``: the decode backend of last resort (``backend.AttentionBackend``): the batch's
  live blocks gathered into one padded batch, then one masked SDPA call. It runs where no
  kernel that reads the blocks in place does (no Triton on CUDA, the C kernel not built, a dtype
  the kernels lack).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitwiser.layers.attention.metadata import AttentionMetadata, kv_blocks


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
    k_cache, v_cache = kv_blocks(meta, layer)
    num_chunks = meta.context_lens.shape[0] - first
    num_heads, head_dim = q.shape[1:]
    num_blocks = -(-meta.max_chunk_context_len // meta.block_size)
    table = meta.block_table[first:, :num_blocks]
    length = meta.max_query_len
    padded = q.new_zeros((num_chunks * length, num_heads, head_dim))
    padded = padded.index_copy_(0, meta.padded_index, q).view(num_chunks, length, num_heads, -1)
    if meta.chunks_start_prompts:
        k, v = _gather(k_cache, table), _gather(v_cache, table)  # [C, kv_heads, L, D]
        # query i sees keys 0..i: SDPA's own causal mask, no mask tensor to build (CPU, 8 x 256
        # tokens: 5.9 against 6.6 ms a layer with the explicit mask, bench/README.md)
        out = _sdpa(padded.transpose(1, 2), k[:, :, :length], v[:, :, :length], scale)
        return _padded_rows(out, meta.padded_index)
    starts = meta.query_starts[first:]
    num_cached = meta.context_lens[first:] - (starts[1:] - starts[:-1])  # [C]
    shared = _shared_prefix_blocks(table, num_cached, meta.block_size)
    if shared * meta.block_size >= CASCADE_MIN_TOKENS:
        return _cascade(q, padded, k_cache, v_cache, table, shared, num_cached, meta, scale)
    k, v = _gather(k_cache, table), _gather(v_cache, table)  # [C, kv_heads, L, D]
    # each padded query row's position in its request; padding rows see some keys too (no row
    # is fully masked) and are dropped
    positions = num_cached[:, None] + torch.arange(length, device=q.device)  # [C, Lq]
    keys = torch.arange(k.shape[2], device=q.device)
    visible = keys[None, None, :] <= positions[:, :, None]  # [C, Lq, L]
    # NOTE: enable_gqa, not paged_decode's grouped queries: with hundreds of queries per
    # request the CPU's flash kernel ran 1.2x faster this way (bench/README.md)
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2), k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=True
    )  # [C, heads, Lq, D]
    return _padded_rows(out, meta.padded_index)


# cascade attention from a shared cached prefix of at least this many tokens (CPU)
CASCADE_MIN_TOKENS = 256


def _shared_prefix_blocks(table: torch.Tensor, num_cached: torch.Tensor, block_size: int) -> int:
    """Leading blocks every chunk's table holds (the same cached prefix, e.g. a system prompt),
    all of them before every chunk's first query. 0 for a single chunk or off the CPU."""
    if table.shape[0] < 2 or table.device.type != "cpu":
        return 0
    same = (table == table[:1]).all(dim=0).long()  # [n]
    leading = int(same.cumprod(0).sum())
    return min(leading, int(num_cached.min()) // block_size)


def _cascade(q, padded, k_cache, v_cache, table, shared, num_cached, meta, scale):
    """Chunks after one shared cached prefix: every query over the prefix in one unmasked call
    (the prefix's K/V gathered once, not once per chunk), each chunk over the rest of its context
    causally, the two merged by their log-sum-exps. Equal to one softmax over the whole context.
    padded: the chunks' queries [C, Lq, heads, D]."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    num_chunks, length, num_heads, head_dim = padded.shape
    kp, vp = _gather(k_cache, table[:1, :shared]), _gather(v_cache, table[:1, :shared])
    num_kv_heads = kp.shape[1]
    group = num_heads // num_kv_heads
    # GQA without repeating K/V: a K/V head's query group joins its queries (no mask here)
    qp = padded.reshape(num_chunks * length, num_kv_heads, group, head_dim)
    qp = qp.permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * num_chunks * length, head_dim)
    out_p, lse_p = flash(qp, kp, vp, 0.0, False, scale=scale)
    out_p = out_p.view(num_kv_heads, group, num_chunks, length, head_dim)
    out_p = out_p.permute(2, 0, 1, 3, 4).reshape(num_chunks, num_heads, length, head_dim)
    lse_p = lse_p.view(num_kv_heads, group, num_chunks, length)
    lse_p = lse_p.permute(2, 0, 1, 3).reshape(num_chunks, num_heads, length)
    # the rest: keys from the end of the shared prefix, causally
    rest = table[:, shared:]
    kr = _gather(k_cache, rest).repeat_interleave(group, dim=1)  # [C, heads, Lr, D]
    vr = _gather(v_cache, rest).repeat_interleave(group, dim=1)
    start = shared * meta.block_size
    positions = (num_cached - start)[:, None] + torch.arange(length, device=q.device)  # [C, Lq]
    keys = torch.arange(kr.shape[2], device=q.device)
    hidden = keys[None, None, :] > positions[:, :, None]  # [C, Lq, Lr]
    mask = torch.zeros(hidden.shape, dtype=q.dtype).masked_fill_(hidden, float("-inf"))
    out_r, lse_r = flash(padded.transpose(1, 2), kr, vr, 0.0, False, attn_mask=mask[:, None],
                         scale=scale)  # fmt: skip
    top = torch.maximum(lse_p, lse_r)
    wp, wr = torch.exp(lse_p - top)[..., None], torch.exp(lse_r - top)[..., None]
    out = (out_p * wp + out_r * wr) / (wp + wr)
    return _padded_rows(out.to(q.dtype), meta.padded_index)


def _padded_rows(out: torch.Tensor, padded_index: torch.Tensor) -> torch.Tensor:
    """The real tokens' rows of a padded batch's output [C, heads, Lq, D] -> [T, heads, D]."""
    num_chunks, num_heads, length, head_dim = out.shape
    out = out.transpose(1, 2).reshape(num_chunks * length, num_heads, head_dim)
    return out.index_select(0, padded_index)


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The blocks of ``table`` [B, n] from ``cache`` [num_blocks, block_size, kv_heads, D],
    each row's in order: [B, kv_heads, n * block_size, D]."""
    num_reqs, num_blocks = table.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    # NOTE: blocks as rows of a 2-D view: index_select copies whole rows (fast on CPU)
    rows = cache.flatten(1).index_select(0, table.flatten())
    shape = (num_reqs, num_blocks * block_size, num_kv_heads, head_dim)
    return rows.view(shape).transpose(1, 2)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Any device and dtype: the fallback when no kernel runs the batch."""
    return True


def paged_decode(
    q: torch.Tensor,  # [T, heads, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D], one layer's keys
    v_cache: torch.Tensor,  # same, its values
    block_table: torch.Tensor,  # [T, max_blocks] int32
    context_lens: torch.Tensor,  # [T] int32
    scale: float,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Decode attention in plain torch: the batch's live blocks gathered (whole blocks, up to
    the longest context) into one padded batch, then one SDPA call with the padding masked.
    The query heads that share a K/V head go in as that head's queries (``[B, kv_heads, group,
    D]``): each K/V head is read once for its whole group, nothing is repeated, and the CPU's
    flash kernel runs 1.2-2.5x faster than with one query per head and ``enable_gqa``
    (``bench/README.md``)."""
    num_reqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_len = max_context_len
    if max_len is None:  # every block of the table (CUDA graphs without Triton)
        max_len = block_table.shape[1] * block_size
    num_blocks = -(-max_len // block_size)
    table = block_table[:, :num_blocks]
    k, v = _gather(k_cache, table), _gather(v_cache, table)  # [B, kvh, L, D]
    live = torch.arange(k.shape[2], device=q.device) < context_lens[:, None]  # [B, L]
    grouped = q.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=live[:, None, None], scale=scale)
    return out.view(num_reqs, num_heads, head_dim)
