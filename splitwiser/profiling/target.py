"""The short representative workload that ``splitwiser profile`` runs under the profiler:
one prompt worker and one token worker with NVTX ranges, N requests at once. No warm-up: Nsight
Compute replays each kernel on its own with caches flushed, so a warm-up changes nothing it reports.

The KV pool holds exactly this workload (not the default share of free device memory): Nsight
Compute's kernel replay saves and restores all the memory a kernel can reach, for every kernel.

    python -m splitwiser.profiling.target --model random:llama-3.2-1b --num-requests 8
"""

from __future__ import annotations

import argparse
import json
import sys

from splitwiser import SamplingParams, SplitwiserPipeline
from splitwiser.benchmark.workloads import build_prompts, build_workload

BLOCK_SIZE = 16


def workload_kv_blocks(num_requests: int, prompt_len: int, output_len: int) -> int:
    """KV blocks for every request of the workload at once (the last token is never cached)."""
    return num_requests * -(-(prompt_len + output_len - 1) // BLOCK_SIZE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--workers-out", default=None, help="write {pid: role} of the workers here")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the target")
    args = ap.parse_args(argv)
    workload = build_workload(
        "fixed",
        num_requests=args.num_requests,
        input_len=args.prompt_len,
        output_len=args.output_len,
        rate=None,
        trace_speedup=None,
        max_context=args.prompt_len + args.output_len,
    )
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    num_blocks = workload_kv_blocks(args.num_requests, args.prompt_len, args.output_len)
    with SplitwiserPipeline(
        args.model, device=args.device, dtype=args.dtype, nvtx_ranges=True,
        block_size=BLOCK_SIZE, num_kv_blocks=num_blocks,
    ) as pipe:  # fmt: skip
        prompts = build_prompts(workload, pipe.tokenizer)
        if args.workers_out:
            roles = {w["pid"]: name.split("-")[1] for name, w in pipe.workers().items()}
            with open(args.workers_out, "w") as f:
                json.dump(roles, f)
        outs = pipe.generate(prompts, params)
        pool_blocks = pipe.num_kv_blocks
    print(f"profiled workload: {len(outs)} requests, {args.prompt_len} prompt tokens, "
          f"{args.output_len} output tokens each; KV pool {pool_blocks} blocks")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
