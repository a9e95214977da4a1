"""The CUDA decode kernel: paged attention that reads the block table itself (Triton).

One program per (request, K/V head): it loads the query heads that share that K/V head once,
then streams the request's blocks tile by tile with an online softmax. Nothing is gathered or
repeated in memory and a request costs its own context, so the step follows live tokens. The
grid depends only on the batch size, so the kernel is captured in the decode CUDA graphs.
Correctness is tested on CPU with Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs: decode falls to the next backend
    AVAILABLE = False

TOKENS_PER_TILE = 64  # K/V rows per loop iteration


if AVAILABLE:

    @triton.jit
    def _paged_decode_kernel(
        Q, K, V, BlockTable, ContextLens, Out, scale,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_tb, stride_ob, stride_oh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        req = tl.program_id(0)
        kv_head = tl.program_id(1)
        context_len = tl.load(ContextLens + req)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        t = tl.arange(0, TILE)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kv_head * GROUP + g
        q_ptrs = Q + req * stride_qb + heads[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G, D]
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start in range(0, context_len, TILE):
            pos = start + t
            t_ok = pos < context_len
            block = tl.load(BlockTable + req * stride_tb + pos // BLOCK_SIZE, mask=t_ok, other=0)
            row = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k_ptrs = K + row[:, None] + kv_head * stride_kh + d[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [TILE, D]
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(t_ok[None, :], s * scale, float("-inf"))  # [G, TILE]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            row_v = block.to(tl.int64) * stride_vb + (pos % BLOCK_SIZE) * stride_vt
            v_ptrs = V + row_v[:, None] + kv_head * stride_vh + d[None, :]
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = Out + req * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Any CUDA batch, where Triton is installed."""
    return q.is_cuda and AVAILABLE


def paged_decode(
    q: torch.Tensor,  # [B, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, >= 1
    scale: float,
    max_context_len: int | None = None,  # unused: each program reads its request's length
) -> torch.Tensor:
    num_reqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    tile = max(TOKENS_PER_TILE, block_size)
    _paged_decode_kernel[(num_reqs, num_kv_heads)](
        q, k_cache, v_cache, block_table, context_lens, out, scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, TILE=tile, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    return out
