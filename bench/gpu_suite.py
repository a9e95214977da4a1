"""The GPU validation suite: one stage per command, each well inside 10 minutes.

    python bench/gpu_suite.py STAGE [--out DIR] [--model M]     (or: bash bench/gpu_suite.sh)

Stages (all write under DIR, default results/gpu/<date>-<device>/):
  env        nvidia-smi, driver, torch and transformers versions, the MPS binary, a daemon
             start and a CUDA client under it (MPS as the bench and profile start it)
  tests      the GPU tests (pytest -m gpu)
  handoff    KV handoff latency, shared vs copy, at 128, 1k and 4k prompt tokens
  bandwidth  the decode-step benchmark (bench/decode_bench.py: achieved bytes/s against the
             device's copy bandwidth) and the attention-kernel spike (bench/attention_spike.py)
  memory     device memory of each process (NVML) with 2 prompt + 2 token workers; then
             what a token worker SIGKILLed mid-run leaves in this process (memory-sigkill.json)
  bench-nomps, bench-mps
             splitwiser bench on azure-conv (32 requests, capped), bf16, against sequential
             and batched
  profile-nomps, profile-mps
             splitwiser profile, both phases (into DIR/profile-{nomps,mps}/)
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


def _child(args: list[str], log: Path, timeout_s: float = STAGE_LIMIT_S) -> int:
    """Run a command in its own session, its output streamed into ``log`` (kept even when it is
    killed); past ``timeout_s``, Ctrl-C to the whole group (so it stops its workers and any
    MPS daemon it started), then SIGKILL. Returns the exit code (124 on timeout)."""
    with open(log, "w") as f:
        f.write(" ".join(args) + "\n\n")
        f.flush()
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            # the child has a session of its own: a Ctrl-C (or timeout's SIGINT) for this
            # process must be passed on, or the child would outlive it
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if isinstance(exc, KeyboardInterrupt):
                f.write("\n[gpu_suite: interrupted]\n")
                raise
            f.write(f"\n[gpu_suite: killed after {timeout_s:.0f} s]\n")
            rc = 124
    print(log.read_text()[-4000:])
    return rc


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


def stage_tests(suite: Suite) -> int:
    out = suite.out
    log = out / "pytest-gpu.log"
    # every gpu-marked test: the CUDA-only ones and the CUDA half of the exactness matrix
    pytest = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rs", "--durations=0"]
    rc = _child([*pytest, "tests"], log, suite.child_limit_s)
    lines = log.read_text().strip().splitlines()
    _write(out, "tests.json", {"returncode": rc, "summary": lines[-1] if lines else ""})
    return rc


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
    """The decode-step benchmark (own code with and without CUDA graphs, the Hugging Face paths;
    achieved bytes/s against the device's copy bandwidth) and the attention-kernel spike."""
    model = ["--model", suite.model] if suite.model else []
    sizes = ["--batch", "1,4", "--context", "16,64", "--iters", "2"] if suite.small else [
        "--batch", "1,16,64,128", "--context", "128,1024,4096",
    ]  # fmt: skip
    rc = _child(
        [sys.executable, "bench/decode_bench.py", *model, "--device", str(suite.device), *sizes,
         "--out", str(suite.out / "decode_bench.json")],
        suite.out / "decode_bench.log", suite.child_limit_s,
    )  # fmt: skip
    if suite.small:
        return rc
    spike = [sys.executable, "bench/attention_spike.py", "--device", str(suite.device),
             "--out", str(suite.out / "attention_spike.json")]  # fmt: skip
    return rc or _child(spike, suite.out / "attention_spike.log", suite.child_limit_s)


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


def stage_bench(suite: Suite, use_mps: bool) -> int:
    out, model = suite.out, suite.model
    # a run of its own each time: a second run the same day must not collide with the first
    name = f"{'bench-mps' if use_mps else 'bench-nomps'}-{time.strftime('%H%M%S')}"
    args = [
        sys.executable, "-m", "splitwiser", "bench", *(["--model", model] if model else []),
        "--dtype", "bfloat16",
        "--device", "cuda", "--procs", "4", "--mps" if use_mps else "--no-mps",
        "--workload", "azure-conv", "--num-requests", "32", "--length-scale", "0.5",
        "--max-context", "2048", "--trace-speedup", "4", "--slo", "ttft_ms=1000,tpot_ms=100",
        "--num-warmup", "4", "--out", str(out), "--run-id", name,
    ]  # fmt: skip
    (out / f"{name}.command").write_text(" ".join(args[2:]).replace("-m splitwiser", "splitwiser"))
    return _child(args, out / f"{name}.run.log", suite.child_limit_s)


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
    "memory": stage_memory,
    "bench-nomps": lambda suite: stage_bench(suite, False),
    "bench-mps": lambda suite: stage_bench(suite, True),
    "profile-nomps": lambda suite: stage_profile(suite, False),
    "profile-mps": lambda suite: stage_profile(suite, True),
}


CPU_STAGES = ("handoff", "bandwidth")  # the only ones that also run (as a smoke test) on CPU


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
