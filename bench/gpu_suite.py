"""The GPU validation suite: one stage per command, each well inside 10 minutes.

    python bench/gpu_suite.py STAGE [--out DIR] [--model M]     (or: bash bench/gpu_suite.sh)

Stages (all write under DIR, default results/gpu/<date>-<device>/):
  env        nvidia-smi, driver, torch and transformers versions, the MPS binary, a daemon
             start and a CUDA client under it (MPS as the bench and profile start it)
  tests      the GPU tests (pytest -m gpu): the CUDA exactness matrix in parallel pytest
             processes, then tests/test_gpu.py alone
  handoff    KV handoff latency, shared vs copy, at 128, 1k and 4k prompt tokens
  bandwidth  the decode-step benchmark (bench/decode_bench.py: achieved bytes/s against the
             device's copy bandwidth)
  spike      the attention-kernel spike (bench/attention_spike.py)
  prefill    the prefill benchmark (bench/prefill_bench.py: tokens/s and the fraction of the
             device's matmul throughput, first call and steady state, the compile count)
  memory     device memory of each process (NVML) with 2 prompt + 2 token workers; then
             what a token worker SIGKILLed mid-run leaves in this process (memory-sigkill.json)
  bench-nomps, bench-mps
             splitwiser bench on azure-conv (16 requests, capped), bf16; without MPS against
             sequential, batched and colocated, with MPS against batched and colocated
  sweep      splitwiser sweep on azure-conv (real lengths capped at 4,096): Splitwiser under
             MPS (all threads, and 70/30) and colocated at 5 rates, SLOs multiples of the
             colocated single-request latency; then Splitwiser without MPS at the same SLOs
  profile-nomps, profile-mps
             splitwiser profile, both phases (into DIR/profile-{nomps,mps}/)

With --device cpu --small the stages that have a CPU form run small on the embedded model (the
tests do so to keep the suite working between GPU runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from splitwiser import SamplingParams, SplitwiserPipeline, mps, profiling
from splitwiser.config import resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
STAGE_LIMIT_S = 540  # a stage's child process, well inside a 10-minute command
CHILD_MARGIN_S = 30  # a stage's child ends this much before the stage's own limit
MODEL = "random:llama-3.2-1b"
GIB = 1 << 30


@dataclass(frozen=True)
class Suite:
    out: Path
    model: str | None  # None: the embedded default
    device: torch.device  # cuda; cpu only to smoke-test the handoff and bandwidth stages
    small: bool = False  # small sizes, for that smoke test
    limit_s: float = STAGE_LIMIT_S  # the stage's time (bench/gpu_suite.sh runs it under timeout)

    @property
    def child_limit_s(self) -> float:
        return max(10.0, self.limit_s - CHILD_MARGIN_S)

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(None, self.device)  # bfloat16 on CUDA


def _write(out: Path, name: str, data) -> None:
    (out / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(json.dumps(data, indent=2, default=str))


def _sh(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{args[0]}: {exc}"


def _start(args: list[str], f) -> subprocess.Popen:
    f.write(" ".join(args) + "\n\n")
    f.flush()
    return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the child's whole group (so it stops its workers and any MPS daemon it
    started), then SIGKILL."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _children(commands: list[tuple[list[str], Path]], timeout_s: float) -> list[int]:
    """Run the commands at once, each in its own session, its output streamed into its log
    (kept even when it is killed); past ``timeout_s`` the ones still running are stopped.
    Returns their exit codes (124: stopped at the limit)."""
    deadline = time.monotonic() + timeout_s
    files = [open(log, "w") for _, log in commands]
    procs = [_start(args, f) for (args, _), f in zip(commands, files)]
    codes = []
    try:
        for proc, f in zip(procs, files):
            try:
                codes.append(proc.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                _stop(proc)
                f.write(f"\n[gpu_suite: killed after {timeout_s:.0f} s]\n")
                codes.append(124)
    except KeyboardInterrupt:
        # the children have sessions of their own: a Ctrl-C (or timeout's SIGINT) for this
        # process must be passed on, or they would outlive it
        for proc, f in zip(procs, files):
            if proc.poll() is None:
                _stop(proc)
                f.write("\n[gpu_suite: interrupted]\n")
        raise
    finally:
        for f in files:
            f.close()
    for _, log in commands:
        print(log.read_text()[-4000:])
    return codes


def _child(args: list[str], log: Path, timeout_s: float = STAGE_LIMIT_S) -> int:
    """One command as ``_children`` runs it; its exit code (124 on timeout)."""
    return _children([(args, log)], timeout_s)[0]


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def stage_env(suite: Suite) -> int:
    import transformers

    out = suite.out
    (out / "nvidia-smi.txt").write_text(_sh("nvidia-smi") + "\n" + _sh("nvidia-smi", "-q"))
    query = "name,driver_version,memory.total,compute_mode,clocks.max.sm,clocks.max.mem"
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": _sh("nvidia-smi", f"--query-gpu={query}", "--format=csv").strip(),
        "mps_control_binary": mps.find_control_binary(),
    }
    for tool in ("ncu", "nsys"):
        try:
            path = profiling.find_tool(tool)
            info[tool] = {"path": path, "version": profiling.tool_version(path)}
        except profiling.ProfilerError as exc:
            info[tool] = f"unavailable: {exc}"
    _write(out, "env.json", info)  # written as it grows: a hang below loses nothing above
    # MPS as bench and profile start it: a daemon, then a CUDA client under it while the daemon
    # is asked for its servers; the stop must return (no client left behind)
    try:
        with mps.session("auto", "cuda") as (daemon, state):
            info["mps"] = state
            _write(out, "env.json", info)
    except subprocess.TimeoutExpired as exc:
        info["mps"] = {"active": False, "reason": f"timed out: {exc}"}
    _write(out, "env.json", info)
    ok = info["mps"]["active"] and "stop" not in info["mps"]
    no_mps = not info["mps"]["active"] and "client_check" not in info["mps"]
    return 0 if ok or no_mps else 1  # a daemon that started but served nobody is a failure


NUM_TEST_SHARDS = 6  # parallel pytest processes
# each sharded test's pipeline takes a KV pool of this size (tests/conftest.py) instead of
# gpu_memory_utilization of the device, which one pipeline alone may take
SHARD_KV_CACHE_BYTES = 4 << 30
ALONE = "tests/test_gpu.py"  # checks the default sizing: runs with the device to itself


def _collect(selection: list[str]) -> list[str]:
    ids = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *selection],
                         capture_output=True, text=True, cwd=ROOT, timeout=120).stdout  # fmt: skip
    return [line for line in ids.splitlines() if "::" in line]


def _summary(log: Path) -> dict:
    """Each test's outcome from a ``pytest -v`` log, and its last line."""
    outcomes, lines = {}, log.read_text().strip().splitlines()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR",
                                                                  "SKIPPED", "XFAIL"):  # fmt: skip
            outcomes[parts[0]] = parts[1]
    return {"outcomes": outcomes, "summary": lines[-1] if lines else ""}


def stage_tests(suite: Suite) -> int:
    """Every gpu-marked test: the CUDA half of the exactness matrix in parallel pytest
    processes (the tests' ids dealt round-robin), then the CUDA-only tests of test_gpu.py."""
    out = suite.out
    selection = ["-m", "gpu", "tests"]
    alone_file, num_shards = ALONE, NUM_TEST_SHARDS
    if suite.small:  # the same plumbing on two quick CPU files
        selection = ["tests/test_model_shape.py", "tests/test_bench_metrics.py"]
        alone_file, num_shards = "tests/test_bench_metrics.py", 2
    t0 = time.monotonic()
    ids = _collect(selection)
    alone = [i for i in ids if i.startswith(alone_file)]
    shards = [s for s in ([i for i in ids if not i.startswith(alone_file)][k::num_shards]
                          for k in range(num_shards)) if s]  # fmt: skip
    pytest = [sys.executable, "-m", "pytest", "-v", "-rs", "--durations=0", "-p",
              "no:cacheprovider"]  # fmt: skip
    runs = [([*pytest, *shard], out / f"pytest-gpu-{k}.log") for k, shard in enumerate(shards)]
    limit_s = suite.child_limit_s
    os.environ["SPLITWISER_TEST_KV_CACHE_BYTES"] = str(SHARD_KV_CACHE_BYTES)
    try:
        codes = _children(runs, limit_s) if runs else []
    finally:
        del os.environ["SPLITWISER_TEST_KV_CACHE_BYTES"]
    if alone:
        left_s = max(10.0, limit_s - (time.monotonic() - t0))
        runs.append(([*pytest, *alone], out / "pytest-gpu-alone.log"))
        codes.append(_child(runs[-1][0], runs[-1][1], left_s))
    logs = {log.name: {"returncode": rc, **_summary(log)} for (_, log), rc in zip(runs, codes)}
    outcomes = {k: v for log in logs.values() for k, v in log.pop("outcomes").items()}
    counts = {o: list(outcomes.values()).count(o) for o in sorted(set(outcomes.values()))}
    _write(out, "tests.json", {
        "collected": len(ids), "counts": counts, "not_run": sorted(set(ids) - set(outcomes)),
        "returncode": max(codes, default=0), "logs": logs, "outcomes": outcomes,
        "wall_s": time.monotonic() - t0,
    })  # fmt: skip
    return 0 if codes and not any(codes) and len(outcomes) == len(ids) else 1


def stage_handoff(suite: Suite) -> None:
    """One request at a time, so the token worker is idle and the figure is the handoff alone."""
    results = {}
    repeats = 2 if suite.small else 12
    for mode in ("shared", "copy"):
        with SplitwiserPipeline(suite.model, device=str(suite.device), kv_handoff=mode) as pipe:
            for n in (16, 64) if suite.small else (128, 1024, 4096):
                params = SamplingParams(max_new_tokens=2, ignore_eos=True)
                pipe.generate([_prompt(n, 0)], params)  # warm-up
                ms, copied = [], []
                for i in range(repeats):
                    o = pipe.generate([_prompt(n, i + 1)], params)[0]
                    ms.append(o.metrics.handoff_s * 1e3)
                    copied.append(o.metrics.kv_bytes_copied)
                results[f"{mode}/{n}"] = {
                    "kv_handoff": mode,
                    "prompt_tokens": n,
                    "median_handoff_ms": statistics.median(ms),
                    "max_handoff_ms": max(ms),
                    "kv_bytes_copied_per_request": statistics.median(copied),
                    "samples_ms": ms,
                }
    info = {"model": suite.model, "device": str(suite.device), "dtype": str(suite.dtype)}
    _write(suite.out, "handoff.json", info | {"results": results})


def _time(fn, iters: int, device: torch.device) -> float:
    """Seconds per call, after one warm-up call (CUDA events on a GPU)."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def stage_bandwidth(suite: Suite) -> int:
    """The decode-step benchmark: own code with and without CUDA graphs, the Hugging Face
    paths; achieved bytes/s against the device's copy bandwidth."""
    model = ["--model", suite.model] if suite.model else []
    sizes = ["--batch", "1,4", "--context", "16,64", "--iters", "2"] if suite.small else [
        "--batch", "1,16,64,128", "--context", "128,1024,4096",
    ]  # fmt: skip
    return _child(
        [sys.executable, "bench/decode_bench.py", *model, "--device", str(suite.device), *sizes,
         "--out", str(suite.out / "decode_bench.json")],
        suite.out / "decode_bench.log", suite.child_limit_s,
    )  # fmt: skip


def stage_spike(suite: Suite) -> int:
    spike = [sys.executable, "bench/attention_spike.py", "--device", str(suite.device),
             "--out", str(suite.out / "attention_spike.json")]  # fmt: skip
    return _child(spike, suite.out / "attention_spike.log", suite.child_limit_s)


def stage_prefill(suite: Suite) -> int:
    """The prefill benchmark: own code and the Hugging Face modules, 256 to 16k batch tokens,
    one prompt length and a mix, first call and steady state; the compile count."""
    model = ["--model", suite.model] if suite.model else []
    sizes = ["--small"] if suite.small else ["--iters", "3", "--max-point-s", "2"]
    return _child(
        [sys.executable, "bench/prefill_bench.py", *model, "--device", str(suite.device), *sizes,
         "--out", str(suite.out / "prefill_bench.json")],
        suite.out / "prefill_bench.log", suite.child_limit_s,
    )  # fmt: skip


def _gpu_processes(handle) -> dict[int, int]:
    """pid -> device memory used, as NVML attributes it (MPS clients listed apart)."""
    import pynvml

    used = {}
    for query in (
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetMPSComputeRunningProcesses",
    ):
        try:
            for p in getattr(pynvml, query)(handle):
                used[p.pid] = p.usedGpuMemory
        except (pynvml.NVMLError, AttributeError):
            pass
    return used


def stage_memory(suite: Suite) -> int:
    """Device memory of each process with 2 + 2 workers: the weights and the pool belong to the
    parent, which allocated them; a worker that maps them through CUDA IPC holds only its
    context and activations. Per process, so five CUDA contexts cannot blur the figure."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    pool_bytes = 4 * GIB
    with SplitwiserPipeline(
        suite.model, device="cuda", num_prompt_workers=2, num_token_workers=2,
        kv_cache_bytes=pool_bytes,
    ) as pipe:  # fmt: skip
        pipe.generate([_prompt(256, 0)] * 8, SamplingParams(max_new_tokens=8, ignore_eos=True))
        used = _gpu_processes(handle)
        workers = pipe.workers()
        weight_bytes = sum(p.numel() * p.element_size() for p in pipe._engine.model.parameters())
        kv_pool_bytes = pipe.num_kv_blocks * pipe._engine.layout.bytes_per_block
    names = {os.getpid(): "parent"} | {w["pid"]: name for name, w in workers.items()}
    per_process = {names.get(pid, f"other pid {pid}"): {"pid": pid, "used_bytes": b}
                   for pid, b in used.items()}  # fmt: skip
    worker_bytes = [used[w["pid"]] for w in workers.values() if used.get(w["pid"]) is not None]
    parent = used.get(os.getpid())
    _write(suite.out, "memory.json", {
        "model": suite.model, "weight_bytes": weight_bytes, "kv_pool_bytes": kv_pool_bytes,
        "per_process": per_process,
        "parent_minus_pool_over_weights":
            None if parent is None else (parent - kv_pool_bytes) / weight_bytes,
        "max_worker_over_weights": max(worker_bytes) / weight_bytes if worker_bytes else None,
        "workers": workers,
        "note": "NVML's per-process figure includes each process's CUDA context (~0.5 GiB); "
                "a worker holding its own copy of the weights would show max_worker_over_weights "
                "near 1 or above; under MPS NVML may list only the MPS server",
    })  # fmt: skip
    missing = [n for n, w in workers.items() if w["pid"] not in used]
    if parent is None or missing:
        print(f"gpu_suite: NVML did not list {['parent', *missing] if parent is None else missing}")
    try:
        report = _sigkill_leftovers(suite, handle)
    except Exception as exc:  # recorded: the measurement above stands on its own
        report = {"error": f"{type(exc).__name__}: {exc}"}
    _write(suite.out, "memory-sigkill.json", report)
    return 0


def _sigkill_leftovers(suite: Suite, handle) -> dict:
    """What a token worker SIGKILLed mid-run leaves in this process (which allocated the
    weights and the pool and lent them through CUDA IPC): its device memory (NVML) and torch's
    own counts, before the kill, after the restarted worker finished the requests, and after
    ``close()``. Memory still held after close is what a later system in the same process
    would inherit (the bench runs each system in a process of its own for this reason)."""
    me = os.getpid()

    def snapshot() -> dict:
        torch.cuda.synchronize()
        return {"nvml_used_bytes": _gpu_processes(handle).get(me),
                "torch_allocated": torch.cuda.memory_allocated(),
                "torch_reserved": torch.cuda.memory_reserved()}  # fmt: skip

    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    report = {"before_pipeline": snapshot()}
    with SplitwiserPipeline(
        suite.model, device="cuda", num_prompt_workers=1, num_token_workers=2,
        kv_cache_bytes=2 * GIB,
    ) as pipe:  # fmt: skip
        pipe.generate([_prompt(256, 1)] * 4, params)
        report["before_kill"] = snapshot()
        handles = [pipe.submit(_prompt(256, 10 + i), params) for i in range(16)]
        victim = "splitwiser-token-0"
        for h in handles:  # every request past its first decode step: both workers decode
            tokens = h.stream(timeout=60)
            next(tokens), next(tokens)
        os.kill(pipe.workers()[victim]["pid"], signal.SIGKILL)
        outs = [h.result(timeout=120) for h in handles]
        report |= {"killed": victim, "completed": len(outs), "stats": pipe.stats(),
                   "after_restart": snapshot()}  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.ipc_collect()
    report["after_close"] = snapshot()
    return report


def _serving_args(suite: Suite) -> list[str]:
    """The model, device and workload bench and sweep share: random:llama-3.2-1b in bf16 on
    azure-conv on a GPU; the embedded model on a tiny fixed workload with --small."""
    if suite.small:
        return ["--device", str(suite.device), "--procs", "2", "--workload", "fixed", "--input-len",
                "16", "--output-len", "4", "--num-warmup", "1", "--no-plots"]  # fmt: skip
    return [*(["--model", suite.model] if suite.model else []), "--dtype", "bfloat16",
            "--device", str(suite.device), "--procs", "4", "--workload", "azure-conv",
            "--num-warmup", "4"]  # fmt: skip


def _splitwiser(suite: Suite, command: str, name: str, args: list[str], limit_s: float) -> int:
    """``splitwiser <command>`` into run ``name``; the command line is kept next to it."""
    args = [sys.executable, "-m", "splitwiser", command, *_serving_args(suite), *args,
            "--out", str(suite.out), "--run-id", name]  # fmt: skip
    (suite.out / f"{name}.command").write_text(" ".join(["splitwiser", *args[3:]]))
    return _child(args, suite.out / f"{name}.run.log", limit_s)


def stage_bench(suite: Suite, use_mps: bool) -> int:
    """Against sequential, batched and colocated without MPS; under MPS against batched and
    colocated (each request alone does not share the device: MPS cannot change it)."""
    # a run of its own each time: a second run the same day must not collide with the first
    name = f"{'bench-mps' if use_mps else 'bench-nomps'}-{time.strftime('%H%M%S')}"
    baselines = "batched,colocated" if use_mps else "sequential,batched,colocated"
    mps_flag = ("--mps" if not suite.small else "--mps=auto") if use_mps else "--no-mps"
    sizes = [
        "--num-requests", "16", "--length-scale", "0.5", "--max-context", "2048",
        "--trace-speedup", "4", "--slo", "ttft_ms=1000,tpot_ms=100",
    ]  # fmt: skip
    if suite.small:  # Splitwiser alone: every system is a process start of its own here
        baselines, sizes = "none", ["--num-requests", "2"]
    return _splitwiser(suite, "bench", name, [mps_flag, "--baseline", baselines, *sizes],
                       suite.child_limit_s)  # fmt: skip


SWEEP_RATES = "2,4,8,16,32"  # req/s: 710 prompt tokens on average, 2.9k-token/s prefill at 4
SWEEP_SLO = "ttft_ms=10x,tpot_ms=5x"  # x the colocated system's single request, in this run
SWEEP_MPS_SPLITS = ("70,30",)  # besides the Splitwiser system's own: every thread to each


def stage_sweep(suite: Suite) -> int:
    """Splitwiser under MPS (each worker all threads, then each --mps-split), colocated (an
    MPS client too: one process) at each rate, SLOs multiples of the colocated single-request
    latency; then Splitwiser without MPS (another daemon state: another run) at the SLOs the
    first run resolved. Each run keeps its systems up across all its points."""
    stamp = time.strftime("%H%M%S")
    first, second = f"sweep-mps-{stamp}", f"sweep-nomps-{stamp}"
    sizes = ["--num-requests", "24", "--max-context", "4096", "--rate", SWEEP_RATES]
    mps_args = ["--mps", *(a for split in SWEEP_MPS_SPLITS for a in ("--mps-split", split))]
    mps_args += ["--baseline", "colocated"]
    if suite.small:  # Splitwiser alone (each system is a process start), MPS where it is
        sizes, mps_args = (
            ["--num-requests", "4", "--rate", "4,8"],
            ["--mps=auto", "--baseline", "none"],
        )
    t0 = time.monotonic()
    rc = _splitwiser(suite, "sweep", first, [*mps_args, *sizes, "--slo", SWEEP_SLO],
                     suite.child_limit_s * 0.75)  # fmt: skip
    slo = SWEEP_SLO
    try:
        resolved = json.loads((suite.out / first / "sweep.json").read_text())["slo"]
        slo = ",".join(f"{k}={v:.3f}" for k, v in resolved.items())
    except (OSError, ValueError, KeyError) as exc:
        print(f"gpu_suite: {first} gave no SLOs ({exc}); {second} measures its own")
    left_s = max(10.0, suite.child_limit_s - (time.monotonic() - t0))
    rc2 = _splitwiser(suite, "sweep", second, ["--no-mps", "--baseline", "none", *sizes,
                                              "--slo", slo], left_s)  # fmt: skip
    return rc or rc2


def stage_prefix(suite: Suite) -> int:
    """Prefix caching on a prefix-repetition workload (4 prefixes of 1,536 tokens, 96 requests
    of 32 own tokens each, 16 out, all at once): Splitwiser with the cache, then without, each
    summary with its hit rate and TTFT (``prefix-on-*/``, ``prefix-off-*/``)."""
    stamp = time.strftime("%H%M%S")
    args = ["--workload", "prefix-repetition", "--baseline", "none", "--num-requests", "96",
            "--prefix-repetition-prefix-len", "1536", "--prefix-repetition-suffix-len", "32",
            "--prefix-repetition-num-prefixes", "4", "--output-len", "16"]  # fmt: skip
    if suite.small:
        args = [*args[:4], "--num-requests", "4", "--prefix-repetition-prefix-len", "32",
                "--prefix-repetition-suffix-len", "8", "--prefix-repetition-num-prefixes", "1",
                "--output-len", "4"]  # fmt: skip
    t0 = time.monotonic()
    rc = _splitwiser(suite, "bench", f"prefix-on-{stamp}", args, suite.child_limit_s / 2)
    left_s = max(10.0, suite.child_limit_s - (time.monotonic() - t0))
    off = [*args, "--no-enable-prefix-caching"]
    return rc or _splitwiser(suite, "bench", f"prefix-off-{stamp}", off, left_s)


def stage_profile(suite: Suite, use_mps: bool) -> int:
    """Both phases under Nsight Compute; the summaries go to results/profile/. Under MPS ncu may
    refuse (its release notes list MPS as unsupported): the log then says so."""
    out, model = suite.out, suite.model
    dest = out / f"profile-{'mps' if use_mps else 'nomps'}"
    args = [
        sys.executable, "-m", "splitwiser", "profile", *(["--model", model] if model else []),
        "--dtype", "bfloat16", "--phase", "both", "--mps" if use_mps else "--no-mps",
        "--out", str(dest),
    ]  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    return _child(args, dest / "profile.log", suite.child_limit_s)


STAGES = {
    "env": stage_env,
    "tests": stage_tests,
    "handoff": stage_handoff,
    "bandwidth": stage_bandwidth,
    "spike": stage_spike,
    "prefill": stage_prefill,
    "memory": stage_memory,
    "bench-nomps": lambda suite: stage_bench(suite, False),
    "bench-mps": lambda suite: stage_bench(suite, True),
    "sweep": stage_sweep,
    "prefix": stage_prefix,
    "profile-nomps": lambda suite: stage_profile(suite, False),
    "profile-mps": lambda suite: stage_profile(suite, True),
}


# the stages that also run on the CPU (--device cpu; --small: small sizes, for the tests)
CPU_STAGES = (
    "tests", "handoff", "bandwidth", "prefill", "bench-nomps", "bench-mps", "sweep", "prefix",
)  # fmt: skip


def default_out() -> Path:
    name = "cpu"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-")
    return ROOT / "results" / "gpu" / f"{time.strftime('%Y%m%d')}-{name}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=[*STAGES, "all"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--model", default=MODEL, help="a model spec, or 'default' (embedded)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="small sizes (a CPU smoke test)")
    ap.add_argument("--limit-s", type=float, default=STAGE_LIMIT_S,
                    help="the stage's time; its child processes end 30 s before")  # fmt: skip
    args = ap.parse_args()
    on_cpu = args.device == "cpu" and args.stage in CPU_STAGES
    if args.stage != "env" and not on_cpu and not torch.cuda.is_available():
        print(f"gpu_suite: error: stage {args.stage!r} needs a CUDA GPU", file=sys.stderr)
        return 2
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    model = None if args.model == "default" else args.model
    suite = Suite(out, model, torch.device(args.device), args.small, args.limit_s)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    failed = []
    for stage in STAGES if args.stage == "all" else [args.stage]:
        t0 = time.monotonic()
        rc = STAGES[stage](suite) or 0
        print(f"== {stage}: {time.monotonic() - t0:.1f} s, exit {rc} -> {out}")
        if rc:
            failed.append(stage)
    if failed:
        print(f"gpu_suite: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
