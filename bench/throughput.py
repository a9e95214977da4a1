"""Output-token throughput of SplitwiserPipeline against SequentialPipeline on the same requests.

    python bench/throughput.py --num-requests 32 --input-len 128 --output-len 32 \
        --prompt-workers 2 --token-workers 2 --out results/cpu-throughput.json

Both systems get the same prompt token ids and forced output lengths (ignore_eos), one warm-up
request each (excluded), and the same wall-clock definition: submit of the first request to the
finish of the last. The full benchmark driver is ``splitwiser bench``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time

import torch

from splitwiser import SamplingParams, SequentialPipeline, SplitwiserPipeline


def _summary(outputs, wall_s: float) -> dict:
    ttft = [o.metrics.ttft_s * 1e3 for o in outputs]
    tpot = [o.metrics.tpot_s * 1e3 for o in outputs if o.metrics.tpot_s is not None]
    handoff = [o.metrics.handoff_s * 1e3 for o in outputs if o.metrics.handoff_s is not None]
    num_out = sum(len(o.token_ids) for o in outputs)
    return {
        "duration_s": wall_s,
        "output_tokens": num_out,
        "output_throughput": num_out / wall_s,
        "median_ttft_ms": statistics.median(ttft),
        "median_tpot_ms": statistics.median(tpot) if tpot else None,
        "median_handoff_ms": statistics.median(handoff) if handoff else None,
        "kv_bytes_copied": sum(o.metrics.kv_bytes_copied for o in outputs),
    }


def _run(pipe, prompts, params) -> tuple[list, float]:
    pipe.generate([prompts[0]], params)  # warm-up, excluded
    t0 = time.monotonic()
    outputs = pipe.generate(prompts, params)
    return outputs, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--prompt-workers", type=int, default=2)
    ap.add_argument("--token-workers", type=int, default=2)
    ap.add_argument("--kv-handoff", default="shared", choices=["shared", "copy", "both"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    args = ap.parse_args()

    seq = SequentialPipeline(args.model, device=args.device, dtype=args.dtype)
    rng = random.Random(args.seed)
    vocab = seq.model.config.vocab_size
    prompts = [
        [rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)
    ]
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)

    systems = {}
    outputs, wall = _run(seq, prompts, params)
    systems["sequential"] = _summary(outputs, wall)
    reference = [o.token_ids for o in outputs]
    del seq
    modes = ["shared", "copy"] if args.kv_handoff == "both" else [args.kv_handoff]
    for mode in modes:
        with SplitwiserPipeline(
            args.model,
            num_prompt_workers=args.prompt_workers,
            num_token_workers=args.token_workers,
            device=args.device,
            dtype=args.dtype,
            kv_handoff=mode,
        ) as pipe:
            outputs, wall = _run(pipe, prompts, params)
        name = f"splitwiser-{mode}"
        systems[name] = _summary(outputs, wall)
        systems[name]["tokens_equal_sequential"] = [o.token_ids for o in outputs] == reference

    base = systems["sequential"]["output_throughput"]
    result = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "config": vars(args),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": __import__("os").cpu_count(),
            "machine": platform.machine(),
        },
        "systems": systems,
        "output_throughput_ratio_vs_sequential": {
            k: v["output_throughput"] / base for k, v in systems.items() if k != "sequential"
        },
    }
    print(
        f"{'system':<20}{'out tok/s':>11}{'vs seq':>8}{'TTFT p50 ms':>13}{'TPOT p50 ms':>13}"
        f"{'handoff p50 ms':>16}{'KV bytes copied':>17}  exact"
    )
    for name, v in systems.items():
        ratio = v["output_throughput"] / base
        handoff = v["median_handoff_ms"]
        print(
            f"{name:<20}{v['output_throughput']:>11.1f}{ratio:>7.2f}x{v['median_ttft_ms']:>13.1f}"
            f"{v['median_tpot_ms']:>13.2f}{'-' if handoff is None else f'{handoff:.2f}':>16}"
            f"{v['kv_bytes_copied']:>17}  {v.get('tokens_equal_sequential', '-')}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
