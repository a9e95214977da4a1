"""Chunked prefill benchmark: a long prompt prefilled whole against in chunks, and one mixed step
(running decodes plus a prefill chunk in one forward) against the two run separately.

    python bench/chunked_prefill_bench.py [--model M] [--prompt-len 2048] [--chunk 512]
                                          [--decodes 32] [--decode-context 512] [--threads N]

Everything goes through ``ModelRunner`` on the own model code (float32 on the CPU): the whole
prompt is one ``prefill`` call, the chunked prompt one call per chunk over its cached prefix;
the mixed step's chunk is a prompt's second chunk (its first already cached), and its decodes
run separately as the token worker runs them (``ModelRunner.decode`` on a ``DecodeBatch``) and as
one-token chunks. Each figure is the median of ``--iters`` runs after one warm-up; the chunk
attention's two GQA layouts are timed alone at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from splitwiser.kv.pool import KVLayout, allocate_pool
from splitwiser.models.loader import load_model
from splitwiser.models.shape import ModelShape
from splitwiser.worker.decode_batch import DecodeBatch
from splitwiser.worker.heap import keep_freed_memory
from splitwiser.worker.model_runner import ModelRunner, PrefillSeq

BLOCK_SIZE = 16
CPU = torch.device("cpu")


def median_ms(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


class Blocks:
    """Hands out consecutive block ids."""

    def __init__(self):
        self.next = 0

    def take(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK_SIZE)
        self.next += n
        return list(range(self.next - n, self.next))


def run(args) -> None:
    hf = load_model(args.model, dtype=torch.float32, device=CPU).model
    shape = ModelShape.from_hf(hf.config)
    max_len = max(args.prompt_len, 2 * args.chunk, args.decode_context + 1)
    runner = ModelRunner(hf, BLOCK_SIZE, CPU, model_impl="splitwiser", max_model_len=max_len)
    layout = KVLayout.from_shape(shape, BLOCK_SIZE, torch.float32)
    blocks = Blocks()
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, shape.vocab_size, (n,), generator=g).tolist()

    prompt, prompt_blocks = tokens(args.prompt_len), blocks.take(args.prompt_len)
    chunk_prompt, chunk_blocks = tokens(2 * args.chunk), blocks.take(2 * args.chunk)
    decode_prompts = [tokens(args.decode_context) for _ in range(args.decodes)]
    decode_blocks = [blocks.take(args.decode_context + 1) for _ in range(args.decodes)]
    pool = allocate_pool(layout, blocks.next, CPU)
    print(f"model {shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
          f"{torch.get_num_threads()} threads, block size {BLOCK_SIZE}")  # fmt: skip

    # 1) a long prompt, whole and in chunks
    whole = median_ms(lambda: runner.prefill([PrefillSeq(prompt, prompt_blocks)], pool), args.iters)

    def chunked() -> None:
        for start in range(0, args.prompt_len, args.chunk):
            chunk = prompt[start : start + args.chunk]
            runner.prefill([PrefillSeq(chunk, prompt_blocks, start)], pool)

    in_chunks = median_ms(chunked, args.iters)
    num_chunks = -(-args.prompt_len // args.chunk)
    print(f"prefill {args.prompt_len} tokens whole:            {whole:9.1f} ms")
    print(f"prefill {args.prompt_len} tokens in {num_chunks} chunks of {args.chunk}: "
          f"{in_chunks:9.1f} ms ({in_chunks / whole:.2f}x)")  # fmt: skip

    # 2) one mixed step against its two parts
    for p, b in zip(decode_prompts, decode_blocks):
        runner.prefill([PrefillSeq(p, b)], pool)
    runner.prefill([PrefillSeq(chunk_prompt[: args.chunk], chunk_blocks)], pool)
    chunk = PrefillSeq(chunk_prompt[args.chunk :], chunk_blocks, args.chunk)
    decodes = [PrefillSeq([7], b, args.decode_context) for b in decode_blocks]
    batch = DecodeBatch(args.decodes, len(decode_blocks[0]), blocks.next, CPU)
    for b in decode_blocks:
        batch.add(b, args.decode_context, 7)
    mixed = median_ms(lambda: runner.prefill(decodes + [chunk], pool), args.iters)
    chunk_ms = median_ms(lambda: runner.prefill([chunk], pool), args.iters)
    decode_ms = median_ms(lambda: runner.decode(batch, pool), args.iters)
    as_chunks = median_ms(lambda: runner.prefill(decodes, pool), args.iters)
    label = f"{args.decodes} decodes (context {args.decode_context + 1})"
    print(f"mixed step, {label} + a {args.chunk}-token chunk: {mixed:9.1f} ms")
    print(f"  the chunk alone:                          {chunk_ms:9.1f} ms")
    print(f"  the decodes alone (ModelRunner.decode):   {decode_ms:9.1f} ms")
    print(f"  the decodes alone (one-token chunks):     {as_chunks:9.1f} ms")
    print(f"  mixed / separately: {mixed / (chunk_ms + decode_ms):.2f}x")

    # 3) the chunk attention alone: enable_gqa against each K/V head's query group
    heads, kv_heads, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    group, lq, lk = heads // kv_heads, args.chunk, 2 * args.chunk
    q = torch.randn((1, heads, lq, d), generator=g)
    k, v = (torch.randn((1, kv_heads, lk, d), generator=g) for _ in "kv")
    mask = (torch.arange(lk)[None] <= lk - lq + torch.arange(lq)[:, None])[None, None]
    grouped_q = q.view(1, kv_heads, group * lq, d)
    grouped_mask = mask.expand(1, group, lq, lk).reshape(1, 1, group * lq, lk)
    gqa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True), 20)
    grouped = median_ms(lambda: F.scaled_dot_product_attention(grouped_q, k, v, grouped_mask), 20)
    print(f"chunk attention, {lq} queries over {lk} keys, one layer: enable_gqa {gqa:.2f} ms, "
          f"grouped queries {grouped:.2f} ms")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model spec; default: the embedded model")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=512, help="cached tokens per decode")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keep_freed_memory()  # as the workers do
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
