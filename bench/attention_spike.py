"""The attention-kernel spike: candidates for the decode and prefill attention, timed on one
layer of a real model's shapes, each checked against a plain reference first.

    python bench/attention_spike.py [--device cuda] [--out F]

Decode (one query token per request over paged K/V): the kernels that read the block table in
place (Triton on CUDA, ``cpu_kernels``' C kernel on the CPU), the gathered-blocks + SDPA path,
and transformers-style SDPA over K/V repeated per query head. Prefill (packed prompts, causal):
one SDPA call over the right-padded batch, one SDPA call per prompt, and
``torch.nn.attention.varlen.varlen_attn`` where this torch has it (CUDA). On the CPU also the
projections' matmul: ``F.linear`` (MKL's sgemm) against torch's oneDNN linear on the weight as
it is (chosen) and on a copy packed for oneDNN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from splitwiser.layers import linear
from splitwiser.layers.attention import AttentionMetadata, kv_blocks, prefill_attention, sdpa
from splitwiser.layers.attention import cpu_paged as cpu_kernels
from splitwiser.layers.attention import triton_paged as triton_attention

HEADS, KV_HEADS, HEAD_DIM, BS = 32, 8, 64, 16  # Llama-3.2-1B's attention


def _time_ms(fn, device, iters=20) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[iters // 2]


def decode_candidates(device, dtype, batch: int, ctx: int) -> list[dict]:
    blocks = -(-ctx // BS)
    num_blocks = batch * blocks + 1
    pool = torch.randn((1, 2, num_blocks * BS, KV_HEADS, HEAD_DIM), device=device, dtype=dtype)
    table = torch.randperm(num_blocks - 1, device=device)[: batch * blocks].view(batch, blocks)
    table = table.to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    meta = AttentionMetadata(False, pool, BS, torch.zeros(0), block_table=table,
                             context_lens=lens, max_context_len=ctx)  # fmt: skip
    q = torch.randn((batch, HEADS, HEAD_DIM), device=device, dtype=dtype)
    k_cache, v_cache = kv_blocks(meta, 0)
    scale = HEAD_DIM**-0.5
    ref = sdpa.paged_decode(q.double(), k_cache.double(), v_cache.double(), table, lens, scale, ctx)

    def per_head_gqa():  # one query per head, SDPA's enable_gqa (before grouping)
        k = k_cache.flatten(1)[table.flatten().long()].view(batch, -1, KV_HEADS, HEAD_DIM)
        v = v_cache.flatten(1)[table.flatten().long()].view(batch, -1, KV_HEADS, HEAD_DIM)
        live = torch.arange(k.shape[1], device=device) < lens[:, None]
        return F.scaled_dot_product_attention(
            q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=live[:, None, None],
            scale=scale, enable_gqa=True,
        )[:, :, 0]  # fmt: skip

    def repeated():  # what transformers' SDPA does given a mask: K/V copied per query head
        k = k_cache[table.long()].view(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v_cache[table.long()].view(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        k, v = (x.repeat_interleave(HEADS // KV_HEADS, 1) for x in (k, v))
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale)[:, :, 0]

    cands = {
        "gathered_sdpa": lambda: sdpa.paged_decode(q, k_cache, v_cache, table, lens, scale, ctx),
        "gathered_sdpa_per_head_gqa": per_head_gqa,
        "repeat_kv_sdpa": repeated,
    }
    if cpu_kernels.supports(q, k_cache):
        cands["cpu_paged_kernel"] = lambda: cpu_kernels.paged_decode(
            q, k_cache, v_cache, table, lens, scale
        )
    if device.type == "cuda" and triton_attention.AVAILABLE:
        cands["triton_paged"] = lambda: triton_attention.paged_decode(
            q, k_cache, v_cache, table, lens, scale
        )
    kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * pool.element_size()
    rows = []
    for name, fn in cands.items():
        err = ((fn().double() - ref).norm() / ref.norm()).item()
        ms = _time_ms(fn, device)
        rows.append({"phase": "decode", "kernel": name, "batch": batch, "context": ctx,
                     "ms": ms, "kv_gb_s": kv_bytes / ms / 1e6, "rel_error": err})  # fmt: skip
    return rows


def prefill_candidates(device, dtype, lens: list[int]) -> list[dict]:
    total, longest = sum(lens), max(lens)
    q = torch.randn((total, HEADS, HEAD_DIM), device=device, dtype=dtype)
    k, v = (torch.randn((total, KV_HEADS, HEAD_DIM), device=device, dtype=dtype) for _ in "kv")
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
    padded = [i * longest + t for i, n in enumerate(lens) for t in range(n)]
    meta = AttentionMetadata(True, torch.empty(0), BS, torch.zeros(0), query_starts=starts,
                             max_query_len=longest,
                             padded_index=torch.tensor(padded, device=device))  # fmt: skip
    scale = HEAD_DIM**-0.5
    bounds = starts.tolist()

    def per_prompt():
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            qq, kk, vv = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale,
                                               enable_gqa=True)  # fmt: skip
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    cands = {"padded_sdpa": lambda: prefill_attention(q, k, v, meta, scale),
             "sdpa_per_prompt": per_prompt}  # fmt: skip
    try:
        from torch.nn.attention.varlen import varlen_attn

        if device.type == "cuda":
            cu = starts.to(torch.int32)

            def varlen():
                kk = k.repeat_interleave(HEADS // KV_HEADS, 1)
                vv = v.repeat_interleave(HEADS // KV_HEADS, 1)
                return varlen_attn(q, kk, vv, cu, cu, longest, longest, scale=scale,
                                   window_size=(-1, 0))  # fmt: skip

            cands["varlen_attn"] = varlen
    except ImportError:
        pass
    ref = per_prompt().double()
    rows = []
    for name, fn in cands.items():
        try:
            err = ((fn().double() - ref).norm() / ref.norm()).item()
            ms = _time_ms(fn, device)
        except Exception as exc:  # a candidate this torch cannot run: recorded, not fatal
            rows.append({"phase": "prefill", "kernel": name, "error": str(exc)[:300]})
            continue
        rows.append({"phase": "prefill", "kernel": name, "prompts": len(lens),
                     "tokens": total, "ms": ms, "rel_error": err})  # fmt: skip
    return rows


def linear_candidates(rows: int, in_features: int, out_features: int) -> list[dict]:
    """CPU float32: the projections' matmul, one weight, ``rows`` tokens."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((rows, in_features), generator=gen)
    w = torch.randn((out_features, in_features), generator=gen)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=rows)
    cands = {"f_linear_mkl": lambda: F.linear(x, w),
             "onednn_in_place": lambda: linear._onednn_linear(x, w),
             "onednn_packed_copy": lambda: linear._onednn_linear(x, packed)}  # fmt: skip
    ref = F.linear(x.double(), w.double())
    out = []
    for name, fn in cands.items():
        err = ((fn().double() - ref).norm() / ref.norm()).item()
        ms = _time_ms(fn, torch.device("cpu"), iters=50)
        out.append({"phase": "linear", "kernel": name, "rows": rows, "in": in_features,
                    "out": out_features, "ms": ms,
                    "gflop_s": 2 * rows * in_features * out_features / ms / 1e6,
                    "rel_error": err})  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small = device.type == "cpu"
    rows = []
    for batch, ctx in (
        ((1, 1024), (8, 512), (32, 512), (128, 512))
        if small
        else ((1, 1024), (16, 1024), (64, 1024), (64, 4096), (128, 1024))
    ):
        rows += decode_candidates(device, dtype, batch, ctx)
    for lens in ([128, 64, 32], [256] * 4) if small else ([512] * 8, [2048, 300, 100, 40], [4096]):
        rows += prefill_candidates(device, dtype, lens)
    if device.type == "cpu":  # the embedded model's MLP and Llama-3.2-1B's
        for shape in ((256, 704), (2048, 8192)):
            for n in (1, 8, 32, 128, 4096):
                rows += linear_candidates(n, *shape)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        info = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                "threads": torch.get_num_threads(),
                "command": " ".join(["python", *sys.argv]), "rows": rows}  # fmt: skip
        args.out.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
