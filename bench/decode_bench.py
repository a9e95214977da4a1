"""Decode-step benchmark: step time and achieved bytes/s against batch size and context, for
Splitwiser's own model code, for the Hugging Face modules with the same paged attention, and for
Hugging Face's own decode step (``generate()``'s: DynamicCache and its SDPA), in one run.

    python bench/decode_bench.py [--model M] [--device cpu|cuda] [--dtype T]
                                 [--batch 1,8,32,128] [--context 128,512,1024,4096] [--out F]

A step is what a token worker runs: the model forward of one token per request over the
persistent decode batch, then on-device sampling with one host synchronisation. Bytes per step
count every weight once and every request's live K/V once (gpt-fast's measure); on CUDA the
achieved rate is also given as a fraction of the device's measured copy bandwidth (bytes read
plus written). On CUDA the own-code path replays its CUDA graphs (``eager`` rows: without).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from splitwiser.config import resolve_device, resolve_dtype
from splitwiser.kv.pool import KVLayout
from splitwiser.models.loader import load_model
from splitwiser.models.registry import resolve_model_impl
from splitwiser.models.shape import ModelShape
from splitwiser.sampling import SamplingParams, sample_next
from splitwiser.worker.decode_batch import DecodeBatch
from splitwiser.worker.heap import keep_freed_memory
from splitwiser.worker.model_runner import ModelRunner

BLOCK_SIZE = 16
GREEDY = SamplingParams()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gb_s(device: torch.device, num_bytes: int = 1 << 31) -> float:
    """A device-to-device copy: bytes read plus bytes written, per second (median of 10)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * num_bytes / sorted(times[1:])[5] / 1e9


def time_steps(runner, batch, pool, device, iters: int) -> float:
    """Median seconds of one decode step (forward, sampling, advance, the step's one sync)."""
    positions = list(batch.host_positions)
    rows = [(GREEDY, 0, 0)] * batch.num_rows
    times = []
    for _ in range(iters + 2):
        # back to the same context every step: the cost measured is one context's
        batch.positions[: batch.num_rows] = torch.tensor(positions, device=device)
        batch.host_positions = list(positions)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            new = sample_next(runner.decode(batch, pool), rows)
            batch.advance(new)
            new.tolist()
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]


def time_hf_steps(hf, batch: int, ctx: int, device, iters: int) -> float:
    """Median seconds of one batched decode step as ``generate()`` runs it: the model's own
    attention over its DynamicCache (cropped back to ``ctx`` between steps, untimed)."""
    from transformers import DynamicCache

    layout = KVLayout.from_shape(ModelShape.from_hf(hf.config), BLOCK_SIZE, hf.dtype)
    cache = DynamicCache(config=hf.config)
    shape = (batch, layout.num_kv_heads, ctx, layout.head_dim)
    for layer in range(layout.num_layers):  # random K/V: a prefill of this size costs minutes
        k, v = (torch.randn(shape, dtype=hf.dtype, device=device) for _ in "kv")
        cache.update(k, v, layer)
    step_ids = torch.full((batch, 1), 7, dtype=torch.long, device=device)
    mask = torch.ones((batch, ctx + 1), dtype=torch.long, device=device)
    times = []
    for _ in range(iters + 2):
        extra = cache.get_seq_length() - ctx
        if extra > 0:
            cache.crop(-extra)  # a negative count: the form every transformers >= 5.17 takes
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            out.logits[:, -1].float().argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]


def _row(impl, mode, b, ctx, step_s, moved, copy_gbs) -> dict:
    row = {
        "impl": impl, "mode": mode, "batch": b, "context": ctx, "step_ms": step_s * 1e3,
        "bytes_per_step": moved, "achieved_gb_s": moved / step_s / 1e9,
    }  # fmt: skip
    if copy_gbs:
        row["fraction_of_copy_bandwidth"] = row["achieved_gb_s"] / copy_gbs
    print(_fmt(row), flush=True)
    return row


def run(args) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_model(args.model, dtype=dtype, device=device)
    hf = loaded.model
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    layout = KVLayout.from_shape(ModelShape.from_hf(hf.config), BLOCK_SIZE, dtype)
    batches, contexts = _ints(args.batch), _ints(args.context)
    max_len = max(contexts) + 1
    blocks_per_seq = -(-max_len // BLOCK_SIZE)
    num_blocks = max(batches) * blocks_per_seq + 1  # + the scratch block
    shape = (layout.num_layers, 2, num_blocks * BLOCK_SIZE, layout.num_kv_heads, layout.head_dim)
    pool = torch.randn(shape, dtype=dtype, device=device)  # random K/V: no zero short-cuts
    impls = ["splitwiser", "transformers"]
    if resolve_model_impl(hf.config, "auto") != "splitwiser":
        impls = ["transformers"]
    copy_gbs = copy_bandwidth_gb_s(device) if device.type == "cuda" else None
    rows = []
    for impl in impls:
        modes = ["graphs", "eager"] if device.type == "cuda" and impl == "splitwiser" else ["eager"]
        for mode in modes:
            runner = ModelRunner(hf, BLOCK_SIZE, device, model_impl=impl, max_model_len=max_len,
                                 fuse=mode == "graphs")  # fmt: skip
            for b in batches:
                batch = DecodeBatch(b, blocks_per_seq, num_blocks - 1, device)
                runner.graphs = {}
                if mode == "graphs":
                    runner.capture_decode_graphs(batch, pool, [b])
                for ctx in contexts:
                    batch.clear()
                    for i in range(b):
                        blocks = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
                        batch.add(blocks, ctx, 7)
                    step_s = time_steps(runner, batch, pool, device, args.iters)
                    moved = weight_bytes + b * (ctx + 1) * layout.bytes_per_token
                    rows.append(_row(impl, mode, b, ctx, step_s, moved, copy_gbs))
                runner.graphs = {}
    if args.hf_generate:
        hf.set_attn_implementation("sdpa")
        for b in batches:
            for ctx in contexts:
                step_s = time_hf_steps(hf, b, ctx, device, args.iters)
                moved = weight_bytes + b * (ctx + 1) * layout.bytes_per_token
                rows.append(_row("hf-generate", "eager", b, ctx, step_s, moved, copy_gbs))
    return {
        "model": loaded.name, "device": str(device), "dtype": str(dtype),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "weight_bytes": weight_bytes,
        "kv_bytes_per_token": layout.bytes_per_token, "copy_bandwidth_gb_s": copy_gbs,
        "command": " ".join(["python", *sys.argv]), "steps": rows,
        "speedup_own_over_transformers": _speedups(rows),
    }  # fmt: skip


def _speedups(rows: list[dict]) -> list[dict]:
    """The own code's step (eager, or graphs where run) against each Hugging Face path's."""
    out = []
    for base in ("transformers", "hf-generate"):
        ref = {(r["batch"], r["context"]): r["step_ms"] for r in rows if r["impl"] == base}
        for r in rows:
            key = (r["batch"], r["context"])
            if r["impl"] == "splitwiser" and key in ref:
                out.append({"mode": r["mode"], "against": base, "batch": key[0],
                            "context": key[1], "speedup": ref[key] / r["step_ms"]})  # fmt: skip
    return out


def _fmt(r: dict) -> str:
    frac = r.get("fraction_of_copy_bandwidth")
    tail = f"  {100 * frac:5.1f}% of copy" if frac is not None else ""
    return (
        f"{r['impl']:>12} {r['mode']:>6}  batch {r['batch']:>4}  context {r['context']:>5}  "
        f"{r['step_ms']:8.3f} ms  {r['achieved_gb_s']:8.1f} GB/s{tail}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model spec; default: the embedded model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", default="1,8,32,128")
    ap.add_argument("--context", default="128,512,1024,4096")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--no-hf-generate",
        dest="hf_generate",
        action="store_false",
        help="skip Hugging Face's own decode step",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the workers do
    result = run(args)
    for s in result["speedup_own_over_transformers"]:
        print(f"own code ({s['mode']}) / {s['against']} batch {s['batch']:>4} context "
              f"{s['context']:>5}: {s['speedup']:.2f}x")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
