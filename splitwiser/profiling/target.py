"""The short representative workload that ``splitwiser profile`` runs under the profiler:
one prompt worker and one token worker with NVTX ranges, N requests at once. No warm-up: Nsight
Compute replays each kernel on its own with caches flushed, so a warm-up changes nothing it reports.

    python -m splitwiser.profiling.target --model random:llama-3.2-1b --num-requests 8
"""

from __future__ import annotations

import argparse
import json
import sys

from splitwiser import SamplingParams, SplitwiserPipeline
from splitwiser.benchmark.workloads import build_prompts, build_workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--workers-out", default=None, help="write {pid: role} of the workers here")
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
    with SplitwiserPipeline(args.model, device="cuda", dtype=args.dtype, nvtx_ranges=True) as pipe:
        prompts = build_prompts(workload, pipe.tokenizer)
        if args.workers_out:
            roles = {w["pid"]: name.split("-")[1] for name, w in pipe.workers().items()}
            with open(args.workers_out, "w") as f:
                json.dump(roles, f)
        outs = pipe.generate(prompts, params)
    print(f"profiled workload: {len(outs)} requests, {args.prompt_len} prompt tokens, "
          f"{args.output_len} output tokens each")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
