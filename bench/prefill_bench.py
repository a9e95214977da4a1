"""Prefill benchmark: tokens/s and the fraction of the device's measured matmul throughput
against the batch's tokens, for prompts of one length and for a mix of lengths, Splitwiser's own
model code against the Hugging Face modules with the same attention, first call against steady
state; and how many compilations prompts of ever new lengths cause, in one run.

    python bench/prefill_bench.py [--model M] [--device cpu|cuda] [--dtype T]
                                  [--tokens 256,...,16384] [--prompt-len 512] [--small] [--out F]

A prefill is what a prompt worker runs: ``ModelRunner.prefill`` over a batch of whole prompts
(one flat batch, one right-padded causal SDPA call per layer), K/V written into a pool, the
logits of each prompt's last token. Its FLOPs count every projection once per token, the head
once per prompt and the causal attention's QK^T and PV (the lower triangle, the padding not
counted): achieved FLOP/s over a big square ``torch.matmul``'s in the same run (bfloat16 on
CUDA, float32 on the CPU; measured before and after the points, the higher taken) is the
fraction. On the CPU the own code's projections run oneDNN, which beats torch.matmul's MKL
sgemm (bench/README.md): its fraction can pass 1. ``first_call_ms`` is the first call at a batch's
shape, after the runner ran other shapes; ``cold_call_ms`` the runner's very first call. The
own code is built as serving builds it (``fuse``: RMSNorm and RoPE compiled on CUDA); the
compile count builds it fused on every device and counts torch._dynamo's graphs after each new
prompt length.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from splitwiser.config import resolve_device, resolve_dtype
from splitwiser.kv.pool import KVLayout
from splitwiser.models import llama
from splitwiser.models.loader import load_model
from splitwiser.models.registry import NATIVE_MODELS, resolve_model_impl
from splitwiser.models.shape import ModelShape
from splitwiser.worker.heap import keep_freed_memory
from splitwiser.worker.model_runner import ModelRunner, PrefillSeq

BLOCK_SIZE = 16
TOKENS = {"cuda": "256,512,1024,2048,4096,8192,16384", "cpu": "256,512,1024,2048"}
SMALL_TOKENS = "32,64"
# distinct prompt lengths for the compile count: 1 token, around block sizes, odd, long
COMPILE_LENS = [1, 2, 3, 5, 7, 13, 16, 17, 31, 64, 100, 127, 200, 256, 333, 512, 1000, 2048]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """A square ``torch.matmul`` of ``n``: 2 n^3 FLOPs per call, median of 7 after a warm-up."""
    a, b = (torch.randn((n, n), device=device, dtype=dtype) for _ in "ab")
    times = []
    for _ in range(8):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times[1:])[3] / 1e12


def prompt_lens(num_tokens: int, prompt_len: int, mix: str, seed: int) -> list[int]:
    """``uniform``: prompts of ``prompt_len`` (one of ``num_tokens`` if fewer); ``mixed``:
    lengths drawn between prompt_len / 8 and 2 x prompt_len, the last one cut to fit."""
    if mix == "uniform":
        n = min(prompt_len, num_tokens)
        return [n] * (num_tokens // n) + ([num_tokens % n] if num_tokens % n else [])
    rng, lens = random.Random(seed), []
    while sum(lens) < num_tokens:
        lens.append(min(rng.randint(max(1, prompt_len // 8), 2 * prompt_len),
                        num_tokens - sum(lens)))  # fmt: skip
    return lens


class Prefill:
    """One batch of whole prompts on a runner, into a pool of its own."""

    def __init__(self, runner: ModelRunner, lens: list[int], pool: torch.Tensor, vocab: int):
        g = torch.Generator().manual_seed(sum(lens))
        self.runner, self.pool, self.seqs, block = runner, pool, [], 0
        for n in lens:
            num_blocks = -(-n // BLOCK_SIZE)
            token_ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            self.seqs.append(PrefillSeq(token_ids, list(range(block, block + num_blocks))))
            block += num_blocks

    def __call__(self) -> float:
        """Seconds of one prefill, logits on the host (as a prompt worker samples them)."""
        _sync(self.runner.device)
        t0 = time.perf_counter()
        self.runner.prefill(self.seqs, self.pool).argmax(-1).tolist()
        return time.perf_counter() - t0


class Flops:
    """The useful FLOPs of a prefill batch of prompts of ``lens`` tokens."""

    def __init__(self, hf: torch.nn.Module, shape: ModelShape):
        embeddings = {id(m.weight) for m in (hf.get_input_embeddings(), hf.get_output_embeddings())}
        self.per_token = 2 * sum(p.numel() for p in hf.parameters()
                                 if p.dim() == 2 and id(p) not in embeddings)  # fmt: skip
        self.per_prompt = 2 * hf.get_output_embeddings().weight.numel()  # the last token's head
        # QK^T and PV: 2 FLOPs x head_dim per (query, key) pair, each head, each layer
        self.per_pair = 4 * shape.num_layers * shape.num_heads * shape.head_dim

    def __call__(self, lens: list[int]) -> int:
        pairs = sum(n * (n + 1) // 2 for n in lens)  # causal
        return self.per_token * sum(lens) + self.per_prompt * len(lens) + self.per_pair * pairs


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def time_point(fn: Prefill, iters: int, max_s: float) -> tuple[float, list[float], int]:
    """(first call s, steady calls s, graphs compiled by the first call). At least one steady
    call; at most ``iters``, or fewer once ``max_s`` is spent."""
    graphs = _graphs()
    first = fn()
    compiled, steady, t0 = _graphs() - graphs, [], time.perf_counter()
    while len(steady) < iters and (not steady or time.perf_counter() - t0 < max_s):
        steady.append(fn())
    return first, steady, compiled


def run_points(args, loaded, device, dtype, impls: list[str]) -> list[dict]:
    hf, shape = loaded.model, ModelShape.from_hf(loaded.model.config)
    flops, layout = Flops(hf, shape), KVLayout.from_shape(shape, BLOCK_SIZE, dtype)
    points = [(mix, t, prompt_lens(t, args.prompt_len, mix, args.seed))
              for mix in ("uniform", "mixed") for t in _ints(args.tokens)]  # fmt: skip
    max_len = max(max(lens) for _, _, lens in points) + 1
    num_blocks = max(sum(-(-n // BLOCK_SIZE) for n in lens) for _, _, lens in points) + 1
    pool = torch.zeros((layout.num_layers, 2, num_blocks * BLOCK_SIZE, layout.num_kv_heads,
                        layout.head_dim), device=device, dtype=dtype)  # fmt: skip
    fuse = {"on": True, "off": False, "auto": device.type == "cuda"}[args.fuse]
    rows = []
    for impl in impls:
        runner = ModelRunner(hf, BLOCK_SIZE, device, model_impl=impl, max_model_len=max_len,
                             fuse=fuse and impl == "splitwiser")  # fmt: skip
        cold_s = Prefill(runner, [BLOCK_SIZE + 1], pool, shape.vocab_size)()
        print(f"{impl}: cold call {cold_s * 1e3:.1f} ms", flush=True)
        for mix, num_tokens, lens in points:
            first_s, steady, compiled = time_point(
                Prefill(runner, lens, pool, shape.vocab_size), args.iters, args.max_point_s
            )
            steady_s = sorted(steady)[len(steady) // 2]
            fl = flops(lens)
            row = {
                "impl": impl, "fused": fuse and impl == "splitwiser", "mix": mix,
                "batch_tokens": num_tokens, "num_prompts": len(lens),
                "max_prompt_len": max(lens), "padded_tokens": len(lens) * max(lens),
                "prompt_lens": lens, "cold_call_ms": cold_s * 1e3,
                "first_call_ms": first_s * 1e3, "steady_ms": steady_s * 1e3,
                "steady_samples_ms": [s * 1e3 for s in steady],
                "graphs_compiled_by_first_call": compiled,
                "tokens_per_s": num_tokens / steady_s,
                "first_call_tokens_per_s": num_tokens / first_s,
                "flops": fl, "achieved_tflops": fl / steady_s / 1e12,
            }  # fmt: skip
            print(_fmt(row), flush=True)
            rows.append(row)
        del runner
    return rows


def compile_count(args, loaded, device, dtype) -> dict:
    """The own code built fused; one prefill at each new prompt length: graphs before and
    after each, and the first call's time against a second call's at that length."""
    hf, shape = loaded.model, ModelShape.from_hf(loaded.model.config)
    lens = [n for n in COMPILE_LENS if n <= args.compile_max_len]
    layout = KVLayout.from_shape(shape, BLOCK_SIZE, dtype)
    num_blocks = -(-max(lens) // BLOCK_SIZE) + 1
    pool = torch.zeros((layout.num_layers, 2, num_blocks * BLOCK_SIZE, layout.num_kv_heads,
                        layout.head_dim), device=device, dtype=dtype)  # fmt: skip
    torch._dynamo.reset()
    before = _graphs()
    t0 = time.perf_counter()
    runner = ModelRunner(hf, BLOCK_SIZE, device, max_model_len=max(lens) + 1, fuse=True)
    build_s = time.perf_counter() - t0
    fused = runner.model.rms_norm is not llama.rms_norm  # False: compiling failed here
    after_build, calls = _graphs(), []
    for n in lens:
        fn = Prefill(runner, [n], pool, shape.vocab_size)
        graphs = _graphs()
        first_s = fn()
        calls.append({"prompt_len": n, "graphs_added": _graphs() - graphs,
                      "first_call_ms": first_s * 1e3, "second_call_ms": fn() * 1e3})  # fmt: skip
    return {
        "fused": fused, "build_s": build_s,
        "graphs_at_build": after_build - before,
        "graphs_after_build": _graphs() - after_build,
        "recompiled_at": [c["prompt_len"] for c in calls if c["graphs_added"]],
        "calls": calls,
        "dynamo_counters": {k: dict(counters[k]) for k in ("stats", "frames", "recompiles")},
    }  # fmt: skip


def run(args) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.small:
        args.tokens, args.iters, args.compile_max_len = SMALL_TOKENS, 2, 64
        args.prompt_len, args.matmul_n = 16, 256
    args.tokens = args.tokens or TOKENS["cuda" if device.type == "cuda" else "cpu"]
    loaded = load_model(args.model, dtype=dtype, device=device)
    impls = ["splitwiser", "transformers"]
    if resolve_model_impl(loaded.model.config, "auto") != "splitwiser":
        impls = ["transformers"]
    n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    # NOTE: measured before and after the points, the higher one the reference: on a machine
    # shared with other work one reading alone can be low
    before = matmul_tflops(device, dtype, n)
    rows = run_points(args, loaded, device, dtype, impls)
    after = matmul_tflops(device, dtype, n)
    tflops = max(before, after)
    print(f"torch.matmul {n}x{n} {dtype}: {before:.3f} and {after:.3f} TFLOP/s", flush=True)
    for row in rows:
        row["fraction_of_matmul"] = row["achieved_tflops"] / tflops
        print(_fmt(row))
    compiled = None
    if args.compile_count and NATIVE_MODELS.get(loaded.model.config.model_type) is llama.LlamaModel:
        compiled = compile_count(args, loaded, device, dtype)
        print(f"compile count: {compiled['graphs_at_build']} graphs at build, "
              f"{compiled['graphs_after_build']} after, recompiled at prompt lengths "
              f"{compiled['recompiled_at']}", flush=True)  # fmt: skip
    return {
        "model": loaded.name, "device": str(device), "dtype": str(dtype),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
        "matmul": {"n": n, "dtype": str(dtype), "tflops": tflops, "tflops_before": before,
                   "tflops_after": after},  # fmt: skip
        "points": rows, "speedup_own_over_transformers": _speedups(rows),
        "compile_count": compiled,
    }  # fmt: skip


def _speedups(rows: list[dict]) -> list[dict]:
    """The own code's steady prefill against the Hugging Face modules' at each point."""
    ref = {(r["mix"], r["batch_tokens"]): r["steady_ms"] for r in rows if r["impl"] != "splitwiser"}
    out = []
    for r in rows:
        key = (r["mix"], r["batch_tokens"])
        if r["impl"] == "splitwiser" and key in ref:
            out.append(
                {"mix": key[0], "batch_tokens": key[1], "speedup": ref[key] / r["steady_ms"]}
            )
    return out


def _fmt(r: dict) -> str:
    frac = r.get("fraction_of_matmul")
    tail = f"  {100 * frac:5.1f}% of matmul" if frac is not None else ""
    return (
        f"{r['impl']:>12} {r['mix']:>7}  {r['batch_tokens']:>6} tokens ({r['num_prompts']:>3} "
        f"prompts)  first {r['first_call_ms']:9.1f} ms  steady {r['steady_ms']:9.1f} ms  "
        f"{r['tokens_per_s']:10.0f} tok/s  {r['achieved_tflops']:7.3f} TFLOP/s{tail}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model spec; default: the embedded model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument(
        "--tokens",
        default=None,
        help=f"batch tokens; default {TOKENS['cuda']} on CUDA, {TOKENS['cpu']} on CPU",
    )
    ap.add_argument(
        "--prompt-len",
        type=int,
        default=512,
        help="the uniform batches' prompt length; the mixed ones' scale",
    )
    ap.add_argument("--iters", type=int, default=5, help="steady calls per point (at most)")
    ap.add_argument(
        "--max-point-s",
        type=float,
        default=3.0,
        help="fewer steady calls once a point took this long",
    )
    ap.add_argument(
        "--fuse",
        choices=["auto", "on", "off"],
        default="auto",
        help="the own code's compiled RMSNorm/RoPE; auto: as served (CUDA only)",
    )
    ap.add_argument(
        "--compile-max-len", type=int, default=2048, help="the compile count's longest prompt"
    )
    ap.add_argument("--no-compile-count", dest="compile_count", action="store_false")
    ap.add_argument(
        "--matmul-n",
        type=int,
        default=None,
        help="the reference matmul's size; default 8192 on CUDA, 2048 on CPU",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--small", action="store_true", help="small sizes (tests)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the workers do
    result = run(args)
    for s in result["speedup_own_over_transformers"]:
        print(f"own code / transformers {s['mix']:>7} {s['batch_tokens']:>6} tokens: "
              f"{s['speedup']:.2f}x")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
