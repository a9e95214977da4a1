"""Soak: many short requests through ONE pipeline, watching whether anything grows.

    python bench/soak.py [--system splitwiser|colocated] [--requests 30000] [--warmup 500]
                         [--prompt-len 32 | --prompt-len 8:96] [--wave 100 | --wave 1:100]
                         [--max-growth 0.05] [--out soak.json]

Requests (random token ids, greedy, ``ignore_eos``) go through ``submit()``/``result()`` in
waves; between waves the parent and every worker (pids from ``pipe.workers()``) are sampled:
USS (psutil's ``memory_full_info``: pages only that process maps, so the shared weights and KV
pool never count), private anonymous memory (``RssAnon`` of ``/proc/PID/status``: heap and
anonymous mappings), threads and open descriptors.

How to read the table: one row per process (the parent, then each worker by role), each figure
at the warm-up sample (the first at or after ``--warmup`` requests: start-up, first-use
allocations and caches that fill once are behind it) and at the last, and the growth between
them. A process whose memory runs flat grows by a few percent at most; one that holds something
per request or per batch shape grows steadily with the request count (the JSON's ``samples``
show the curve). The exit status is 1 when any process's USS or RssAnon grew by more than
``--max-growth`` (a fraction), when its threads or descriptors grew by more than
``--max-extra-handles``, when a worker was replaced (a new pid for a name) during the run, or
when an output was wrong: every request must return exactly its ``max_new_tokens`` (finish
"length"), and one fixed greedy request, repeated in every wave, the same tokens each time.

The workers bound oneDNN's per-shape primitive caches (``splitwiser/models/linear.py``); to see
what they hold unbounded, run with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024``
(oneDNN's defaults) and varied shapes (``--prompt-len 8:96 --wave 1:100 --new-tokens 1:16``).
Throughput (requests and output tokens per second after the warm-up) is printed for same-run
comparisons only: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

import psutil

from splitwiser import ColocatedPipeline, SamplingParams, SplitwiserPipeline

PARENT = "parent"


@dataclass
class ProcSample:
    uss: int  # bytes
    rss_anon: int  # bytes
    num_threads: int
    num_fds: int


def rss_anon(pid: int) -> int:
    """Private anonymous resident bytes (heap, anonymous mappings) of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")


def sample_proc(pid: int) -> ProcSample:
    p = psutil.Process(pid)
    return ProcSample(p.memory_full_info().uss, rss_anon(pid), p.num_threads(), p.num_fds())


def _range(text: str) -> tuple[int, int]:
    """``"32"`` or ``"8:96"`` (inclusive) as ``(low, high)``."""
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected N or LOW:HIGH with 1 <= LOW <= HIGH: {text}")
    return lo, hi


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--system", choices=("splitwiser", "colocated"), default="splitwiser")
    ap.add_argument("--model", default=None, help="a model directory or id (default: embedded)")
    ap.add_argument("--prompt-workers", type=int, default=2, help="splitwiser only")
    ap.add_argument("--token-workers", type=int, default=2, help="splitwiser only")
    ap.add_argument("--requests", type=int, default=30_000)
    ap.add_argument("--warmup", type=int, default=500, help="requests before the reference sample")
    ap.add_argument("--prompt-len", type=_range, default=(32, 32), help="N or LOW:HIGH tokens")
    ap.add_argument("--new-tokens", type=_range, default=(8, 8), help="N or LOW:HIGH tokens")
    ap.add_argument("--wave", type=_range, default=(100, 100), help="requests submitted at once")
    ap.add_argument("--sample-every", type=int, default=500, help="requests between samples")
    ap.add_argument("--max-growth", type=float, default=0.05, help="fraction of USS and RssAnon")
    ap.add_argument("--max-extra-handles", type=int, default=2, help="threads, descriptors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write samples and the verdict as JSON")
    args = ap.parse_args(argv)
    if args.warmup >= args.requests:
        ap.error("--warmup must be below --requests")
    return args


def open_pipeline(args):
    if args.system == "colocated":
        return ColocatedPipeline(args.model, device="cpu")
    return SplitwiserPipeline(
        args.model,
        device="cpu",
        num_prompt_workers=args.prompt_workers,
        num_token_workers=args.token_workers,
    )


def sample_all(pipe) -> tuple[dict[str, ProcSample], dict[str, int]]:
    """Every process's figures now, and each worker's pid."""
    pids = {name: info["pid"] for name, info in pipe.workers().items()}
    procs = {PARENT: sample_proc(psutil.Process().pid)}
    for name, pid in sorted(pids.items()):
        procs[name] = sample_proc(pid)
    return procs, pids


def soak(args) -> dict:
    rng = random.Random(args.seed)
    samples, pid_changes, wrong = [], [], []
    probe = probe_tokens = None
    num_done = num_tokens = 0
    t_warm = tokens_warm = None
    with open_pipeline(args) as pipe:
        vocab = len(pipe.tokenizer)
        _, first_pids = sample_all(pipe)
        next_sample = min(args.warmup, args.sample_every)
        while num_done < args.requests:
            # 1) one wave of requests, all submitted before any is waited on
            wave = min(rng.randint(*args.wave), args.requests - num_done)
            requests = [probe] if probe else []  # the same greedy request, once a wave
            while len(requests) < wave:
                prompt = [rng.randrange(vocab) for _ in range(rng.randint(*args.prompt_len))]
                requests.append((prompt, rng.randint(*args.new_tokens)))
            handles = [
                pipe.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
                for prompt, n in requests
            ]
            outputs = [h.result() for h in handles]
            for (_, n), out in zip(requests, outputs):
                if len(out.token_ids) != n or out.finish_reason != "length":
                    wrong.append(f"request {out.request_id}: {len(out.token_ids)} of {n} tokens, "
                                 f"finish {out.finish_reason}")  # fmt: skip
            if probe is None:
                probe, probe_tokens = requests[0], outputs[0].token_ids
            elif outputs[0].token_ids != probe_tokens:
                wrong.append(f"request {outputs[0].request_id}: the probe's tokens changed")
            num_tokens += sum(len(out.token_ids) for out in outputs)
            num_done += wave
            # 2) sample between waves
            if num_done >= next_sample or num_done == args.requests:
                procs, pids = sample_all(pipe)
                changed = {n: p for n, p in pids.items() if first_pids.get(n) != p}
                if changed:
                    pid_changes.append({"requests": num_done, "pids": changed})
                    first_pids.update(changed)
                samples.append(
                    {"requests": num_done, "t_s": time.monotonic(),
                     "procs": {n: asdict(s) for n, s in procs.items()}}
                )  # fmt: skip
                if t_warm is None and num_done >= args.warmup:
                    t_warm, tokens_warm, warm_done = time.monotonic(), num_tokens, num_done
                print(_progress(samples[-1]), file=sys.stderr, flush=True)
                next_sample = (num_done // args.sample_every + 1) * args.sample_every
        elapsed = time.monotonic() - t_warm
    return verdict(args, samples, pid_changes, wrong, (num_done - warm_done) / elapsed,
                   (num_tokens - tokens_warm) / elapsed)  # fmt: skip


def _progress(sample: dict) -> str:
    mib = " ".join(f"{n}={s['rss_anon'] / 2**20:.0f}" for n, s in sample["procs"].items())
    return f"soak: {sample['requests']} requests, RssAnon MiB: {mib}"


def verdict(args, samples, pid_changes, wrong, req_per_s: float, tok_per_s: float) -> dict:
    warm = next(s for s in samples if s["requests"] >= args.warmup)
    last = samples[-1]
    rows, failures = [], []
    for name, end in last["procs"].items():
        start = warm["procs"].get(name)
        if start is None:  # a worker that appeared after the warm-up (a replacement)
            failures.append(f"{name}: not present at the warm-up sample")
            continue
        row = {"name": name}
        for key in ("uss", "rss_anon"):
            growth = end[key] / start[key] - 1
            row[key] = (start[key], end[key], growth)
            if growth > args.max_growth:
                failures.append(f"{name}: {key} grew {growth:+.1%} (limit {args.max_growth:.0%})")
        for key in ("num_threads", "num_fds"):
            row[key] = (start[key], end[key])
            if end[key] - start[key] > args.max_extra_handles:
                failures.append(f"{name}: {key} {start[key]} -> {end[key]}")
        rows.append(row)
    for change in pid_changes:
        failures.append(f"workers replaced by {change['requests']} requests: {change['pids']}")
    failures += [f"wrong output: {w}" for w in wrong[:10]]
    if len(wrong) > 10:
        failures.append(f"wrong output: {len(wrong) - 10} more")
    return {
        "args": {k: v for k, v in vars(args).items()},
        "warmup_requests": warm["requests"],
        "last_requests": last["requests"],
        "requests_per_s": req_per_s,
        "output_tokens_per_s": tok_per_s,
        "rows": rows,
        "failures": failures,
        "samples": samples,
    }


def print_table(result: dict) -> None:
    w, n = result["warmup_requests"], result["last_requests"]
    print(f"{'process':<20} {'USS MiB':>20} {'RssAnon MiB':>20} {'threads':>9} {'fds':>9}")
    print(f"{'':<20} {f'@{w} -> @{n}':>20} {f'@{w} -> @{n}':>20}")
    for r in result["rows"]:
        mem = [
            f"{a / 2**20:.0f} -> {b / 2**20:.0f} {g:+.1%}" for a, b, g in (r["uss"], r["rss_anon"])
        ]  # noqa: E501
        handles = [f"{a} -> {b}" for a, b in (r["num_threads"], r["num_fds"])]
        print(f"{r['name']:<20} {mem[0]:>20} {mem[1]:>20} {handles[0]:>9} {handles[1]:>9}")
    print(f"after the warm-up: {result['requests_per_s']:.1f} requests/s, "
          f"{result['output_tokens_per_s']:.0f} output tokens/s")  # fmt: skip
    for f in result["failures"]:
        print(f"GROWS: {f}")
    print("FAIL" if result["failures"] else "OK: nothing grew past the limits")


def main(argv=None) -> int:
    args = parse_args(argv)
    result = soak(args)
    print_table(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
