"""Soak: many short requests through ONE pipeline, watching whether anything grows.

    python bench/soak.py [--system splitwiser|colocated|serve] [--requests 30000] [--warmup 500]
                         [--prompt-len 32 | --prompt-len 8:96] [--wave 100 | --wave 1:100]
                         [--max-growth 0.05] [--out soak.json]

Requests (random token ids, greedy, ``ignore_eos``) go in waves, all of a wave at once;
between waves the parent and every worker are sampled: USS (psutil's ``memory_full_info``:
pages only that process maps, so the shared weights and KV pool never count), private anonymous
memory (``RssAnon`` of ``/proc/PID/status``: heap and anonymous mappings), threads and open
descriptors. ``splitwiser`` and ``colocated`` run the pipeline in this process (the parent):
requests through ``submit()``/``result()``, workers from ``pipe.workers()``. ``serve`` starts
``splitwiser serve --port 0 --device cpu`` (the split, ``--prompt-workers`` +
``--token-workers``) as a subprocess and sends each request to its ``/v1/completions``
(``temperature`` 0, ``return_token_ids``), a wave's requests concurrently; the parent row is the
server process, the workers are its children named ``sw-<role>-<index>``; before each sample
the client closes its connections and the server's threads and descriptors get a moment to
settle. At the end the server gets SIGTERM and must exit with 0 or 143 and leave no child behind.

How to read the table: one row per process (the parent, then each worker by role), each figure
at the warm-up sample (the first at or after ``--warmup`` requests: start-up, first-use
allocations and caches that fill once are behind it) and at the last, and the growth between
them. A process whose memory runs flat grows by a few percent at most; one that holds something
per request or per batch shape grows steadily with the request count (the JSON's ``samples``
show the curve). The exit status is 1 when any process's USS or RssAnon grew by more than
``--max-growth`` (a fraction; USS's growth as a fraction of the larger of its USS and RssAnon at
the warm-up: a CPU worker forked from the fork server starts with most of its heap shared, and
the pages it writes become private without being new memory), when its threads or
descriptors grew by more than ``--max-extra-handles``, when a worker was replaced (a new pid
for a name) during the run, or when an output was wrong: every request must return exactly
its ``max_new_tokens`` (finish "length"), and one fixed greedy request, repeated in every wave,
the same tokens each time; with ``serve`` also when an HTTP request failed or the server did not
stop cleanly.

The workers bound oneDNN's per-shape primitive caches (``splitwiser/layers/linear.py``); to see
what they hold unbounded, run with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024``
(oneDNN's defaults) and varied shapes (``--prompt-len 8:96 --wave 1:100 --new-tokens 1:16``).
Throughput (requests and output tokens per second after the warm-up) is printed for same-run
comparisons only: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx
import psutil

from splitwiser import ColocatedPipeline, SamplingParams, SplitwiserPipeline
from splitwiser.models.loader import load_tokenizer

PARENT = "parent"
SERVER_START_S = 600.0  # to /health 200: the model's facts, then every worker ready
SERVER_STOP_S = 120.0  # SIGTERM to exit: requests in flight (none), then the workers close
LISTENING = re.compile(r"listening on (http://\S+)")  # the server's log line, with its port


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
    ap.add_argument(
        "--system", choices=("splitwiser", "colocated", "serve"), default="splitwiser",
        help="serve: the split behind splitwiser serve, through HTTP",
    )  # fmt: skip
    ap.add_argument("--model", default=None, help="a model directory or id (default: embedded)")
    ap.add_argument("--prompt-workers", type=int, default=2, help="splitwiser and serve")
    ap.add_argument("--token-workers", type=int, default=2, help="splitwiser and serve")
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


@dataclass
class Completion:
    """One request's answer, as ``RequestOutput`` has it (the fields the checks read)."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None


class InProcess:
    """The pipeline in this process: requests through ``submit()``/``result()``."""

    def __init__(self, args):
        if args.system == "colocated":
            self.pipe = ColocatedPipeline(args.model, device="cpu")
        else:
            self.pipe = SplitwiserPipeline(
                args.model,
                device="cpu",
                num_prompt_workers=args.prompt_workers,
                num_token_workers=args.token_workers,
            )
        self.vocab_size = len(self.pipe.tokenizer)
        self.pid = os.getpid()

    def worker_pids(self) -> dict[str, int]:
        return {name: info["pid"] for name, info in self.pipe.workers().items()}

    def settle(self) -> None:
        pass  # every request is done once its result is in

    def run_wave(self, requests: list[tuple[list[int], int]]) -> list:
        """Every (prompt, max new tokens) submitted before any is waited on."""
        handles = [
            self.pipe.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for prompt, n in requests
        ]
        return [h.result() for h in handles]

    def close(self) -> list[str]:
        self.pipe.close()
        return []


def serve_command(args) -> list[str]:
    cmd = [
        sys.executable, "-m", "splitwiser", "serve", "--port", "0", "--device", "cpu",
        "--procs", str(args.prompt_workers + args.token_workers),
        "--prompt-procs", str(args.prompt_workers), "--no-access-log",
    ]  # fmt: skip
    return cmd + (["--model", args.model] if args.model else [])


class Served:
    """``splitwiser serve`` in a subprocess (its output in a temporary file): requests through
    ``POST /v1/completions``, a wave's at once from a thread pool over keep-alive connections."""

    def __init__(self, args):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="soak-serve-", suffix=".log")
        self.proc = subprocess.Popen(
            serve_command(args), stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.pid = self.proc.pid
        self.server = psutil.Process(self.pid)
        self.num_conns = args.wave[1]
        try:
            self.vocab_size = len(load_tokenizer(args.model))
            listening = self._wait("no 'listening on'", lambda: LISTENING.search(self._log()))
            self.url = listening.group(1)
            self.client = self._connect()
            # /health answers 503 until every worker is ready
            self._wait("never healthy", lambda: self.client.get("/health").status_code == 200)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.threads = ThreadPoolExecutor(self.num_conns, thread_name_prefix="soak-http")

    def _connect(self) -> httpx.Client:
        n = self.num_conns
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        return httpx.Client(base_url=self.url, timeout=300.0, limits=limits)

    def _log(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def _wait(self, what: str, ready):
        """``ready()``'s first true answer, polled while the server runs."""
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            answer = ready()
            if answer:
                return answer
            time.sleep(0.2)
        raise RuntimeError(f"splitwiser serve: {what} (exit {self.proc.poll()}):\n"
                           f"{self._log()[-3000:]}")  # fmt: skip

    def worker_pids(self) -> dict[str, int]:
        pids = {}
        for child in self.server.children(recursive=True):
            try:
                name = child.name()  # the worker wrote it to /proc/self/comm
            except psutil.NoSuchProcess:
                continue
            if name.startswith("sw-"):
                pids[name] = child.pid
        return pids

    def _complete(self, request: tuple[list[int], int]) -> Completion:
        prompt, n = request
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        r = self.client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return Completion(f"HTTP {r.status_code} {r.text[:200]}", [], None)
        answer = r.json()
        choice = answer["choices"][0]
        return Completion(answer["id"], choice["token_ids"], choice["finish_reason"])

    def run_wave(self, requests: list[tuple[list[int], int]]) -> list[Completion]:
        return list(self.threads.map(self._complete, requests))

    def settle(self, timeout_s: float = 5.0) -> None:
        """Close the keep-alive connections, then wait until the server's threads and
        descriptors hold still. NOTE: how many connections a wave opened varies, so the server
        is sampled with none open: what stays is what it keeps."""
        self.client.close()
        self.client = self._connect()
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            now = (self.server.num_threads(), self.server.num_fds())
            if now == last:
                return
            last = now
            time.sleep(0.1)

    def close(self) -> list[str]:
        """SIGTERM, then what went wrong: an exit status other than 0 or 143, a child left."""
        self.threads.shutdown()
        self.client.close()
        children = self.server.children(recursive=True) if self.proc.poll() is None else []
        self.proc.send_signal(signal.SIGTERM)
        problems = []
        try:
            code = self.proc.wait(SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            problems.append(f"the server did not stop within {SERVER_STOP_S:.0f} s of SIGTERM")
        if code not in (0, 128 + signal.SIGTERM):
            problems.append(f"the server exited with {code}:\n{self._log()[-3000:]}")
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            problems.append(f"the server left pid {child.pid} ({child.name()}) running")
            child.kill()
        self.log.close()
        return problems


def open_target(args) -> InProcess | Served:
    return Served(args) if args.system == "serve" else InProcess(args)


def sample_all(target) -> tuple[dict[str, ProcSample], dict[str, int]]:
    """Every process's figures now, and each worker's pid."""
    target.settle()
    pids = target.worker_pids()
    procs = {PARENT: sample_proc(target.pid)}
    for name, pid in sorted(pids.items()):
        procs[name] = sample_proc(pid)
    return procs, pids


def soak(args) -> dict:
    rng = random.Random(args.seed)
    samples, pid_changes, wrong = [], [], []
    probe = probe_tokens = None
    num_done = num_tokens = 0
    t_warm = tokens_warm = None
    target = open_target(args)
    try:
        vocab = target.vocab_size
        _, first_pids = sample_all(target)
        next_sample = min(args.warmup, args.sample_every)
        while num_done < args.requests:
            # 1) one wave of requests, all sent before any is waited on
            wave = min(rng.randint(*args.wave), args.requests - num_done)
            requests = [probe] if probe else []  # the same greedy request, once a wave
            while len(requests) < wave:
                prompt = [rng.randrange(vocab) for _ in range(rng.randint(*args.prompt_len))]
                requests.append((prompt, rng.randint(*args.new_tokens)))
            outputs = target.run_wave(requests)
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
                procs, pids = sample_all(target)
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
    finally:
        shutdown = target.close()
    return verdict(args, samples, pid_changes, wrong, shutdown, (num_done - warm_done) / elapsed,
                   (num_tokens - tokens_warm) / elapsed)  # fmt: skip


def _progress(sample: dict) -> str:
    mib = " ".join(f"{n}={s['rss_anon'] / 2**20:.0f}" for n, s in sample["procs"].items())
    return f"soak: {sample['requests']} requests, RssAnon MiB: {mib}"


def verdict(
    args, samples, pid_changes, wrong, shutdown, req_per_s: float, tok_per_s: float
) -> dict:
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
            # USS against the larger of itself and RssAnon: a worker forked from the fork server
            # shares most of its heap with it, and a shared page it writes becomes private (USS
            # grows, RssAnon does not); a leak grows both
            base = max(start[key], start["rss_anon"]) if key == "uss" else start[key]
            growth = (end[key] - start[key]) / base
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
    failures += [f"shutdown: {p}" for p in shutdown]
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
