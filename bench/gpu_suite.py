"""The GPU validation suite: one stage per command, each well inside 10 minutes.

    python bench/gpu_suite.py STAGE [--out DIR] [--model M]     (or: bash bench/gpu_suite.sh)

Stages (all write under DIR, default results/gpu/<date>-<device>/):
  env        nvidia-smi, driver, torch and transformers versions, the MPS binary, a daemon start
  tests      the GPU tests (pytest -m gpu)
  handoff    KV handoff latency, shared vs copy, at 128, 1k and 4k prompt tokens
  bandwidth  the device's copy bandwidth; decode's achieved bandwidth and prefill's TFLOP/s
  memory     device memory with 2 prompt + 2 token workers against the model's bytes
  bench-nomps, bench-mps
             splitwiser bench against sequential and batched on azure-conv (capped), bf16
  profile-nomps, profile-mps
             splitwiser profile, both phases (to results/profile/<date>-<device>-{nomps,mps})
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
from splitwiser.config import EngineConfig, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
STAGE_LIMIT_S = 540  # a stage's child process, well inside a 10-minute command
MODEL = "random:llama-3.2-1b"
GIB = 1 << 30


@dataclass(frozen=True)
class Suite:
    out: Path
    model: str | None  # None: the embedded default
    device: torch.device  # cuda; cpu only to smoke-test the handoff and bandwidth stages
    small: bool = False  # small sizes, for that smoke test

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
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
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
    try:
        daemon = mps.start_daemon()
    except (mps.MPSUnavailableError, subprocess.TimeoutExpired) as exc:
        info["mps_daemon"] = f"unavailable: {exc}"
        _write(out, "env.json", info)
        return 0
    owned = daemon.owned
    info["mps_daemon"] = {"owned": owned, "pipe_dir": daemon.pipe_dir}
    try:
        # a CUDA client under the daemon: the MPS server must start and run a kernel
        client = subprocess.run(
            [sys.executable, "-c", "import torch; x = torch.ones(1 << 20, device='cuda'); "
             "print('client ok', float((x * 2).sum()))"],
            env=os.environ | daemon.env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        info["mps_client"] = (client.stdout + client.stderr).strip()[-2000:]
        info["mps_client_ok"] = client.returncode == 0 and "client ok" in client.stdout
        info["mps_server_list"] = daemon.status()
    except subprocess.TimeoutExpired as exc:
        info["mps_client"] = f"timed out: {exc}"
        info["mps_client_ok"] = False
    finally:
        daemon.stop()
    info["mps_daemon_stopped"] = not owned or not mps.daemon_responds(daemon.pipe_dir)
    _write(out, "env.json", info)
    return 0 if info["mps_client_ok"] else 1


def stage_tests(suite: Suite) -> int:
    out = suite.out
    log = out / "pytest-gpu.log"
    # every gpu-marked test: the CUDA-only ones and the CUDA half of the exactness matrix
    rc = _child([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rs", "tests"], log)
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


def _copy_bandwidth_gb_s(dev: torch.device, num_bytes: int = 2 * GIB) -> float:
    """Device-to-device copy: bytes read plus bytes written, per second."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), 10, dev)
    return 2 * num_bytes / copy_s / 1e9


def stage_bandwidth(suite: Suite) -> None:
    """gpt-fast's measure: decode moves every weight byte and the live K/V once per step."""
    from splitwiser.engine.kv_pool import KVLayout, allocate_pool
    from splitwiser.engine.model_runner import DecodeSeq, ModelRunner, PrefillSeq
    from splitwiser.models.loader import load_model

    dev, dtype = suite.device, suite.dtype
    copy_gbs = _copy_bandwidth_gb_s(dev, (64 << 20) if suite.small else 2 * GIB)
    loaded = load_model(suite.model, dtype=dtype, device=dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    num_params = sum(p.numel() for p in loaded.model.parameters())
    layout = KVLayout.from_model_config(loaded.model.config, 16, dtype)
    ctx = 128 if suite.small else 1024
    blocks_per_seq = ctx // 16 + 1
    pool = allocate_pool(layout, 64 * blocks_per_seq, dev)
    # the decode attention the pipeline itself uses on this device
    runner = ModelRunner(loaded.model, 16, dev, EngineConfig().decode_attention_for(dev))
    decode = []
    for batch in (1, 4) if suite.small else (1, 8, 32, 64):
        seqs = [
            DecodeSeq(5, ctx, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
            for i in range(batch)
        ]
        step_s = _time(lambda s=seqs: runner.decode(s, pool), 20, dev)
        moved = weight_bytes + batch * (ctx + 1) * layout.bytes_per_token
        decode.append({
            "batch": batch, "context": ctx, "step_ms": step_s * 1e3,
            "bytes_per_step": moved, "achieved_gb_s": moved / step_s / 1e9,
            "fraction_of_copy_bandwidth": moved / step_s / 1e9 / copy_gbs,
        })  # fmt: skip
    prefill = []
    for batch, n in ((1, 64), (2, 128)) if suite.small else ((1, 512), (4, 1024), (8, 2048)):
        seqs = [
            PrefillSeq(_prompt(n, i), list(range(i * 129, (i + 1) * 129))) for i in range(batch)
        ]
        big = allocate_pool(layout, batch * 129, dev)
        step_s = _time(lambda s=seqs, p=big: runner.prefill(s, p), 5, dev)
        flops = 2 * num_params * batch * n  # 2 FLOPs per parameter per token
        prefill.append({"batch": batch, "prompt_tokens": n, "ms": step_s * 1e3,
                        "achieved_tflop_s": flops / step_s / 1e12})  # fmt: skip
        del big
    _write(suite.out, "bandwidth.json", {
        "model": suite.model, "device": str(dev), "dtype": str(dtype), "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": copy_gbs, "decode": decode, "prefill": prefill,
        "note": "decode bytes = weights + live K/V read once per step; prefill FLOPs exclude "
                "attention's quadratic term",
    })  # fmt: skip


def stage_memory(suite: Suite) -> None:
    """Device memory with 2 + 2 workers: the weights should be resident once, not five times."""
    out, model = suite.out, suite.model
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def used() -> int:
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used

    def per_process() -> dict:
        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            return {p.pid: p.usedGpuMemory for p in procs}
        except pynvml.NVMLError as exc:
            return {"unavailable": str(exc)}

    before = used()
    pool_bytes = 4 * GIB
    with SplitwiserPipeline(
        model, device="cuda", num_prompt_workers=2, num_token_workers=2, kv_cache_bytes=pool_bytes
    ) as pipe:
        pipe.generate([_prompt(256, 0)] * 8, SamplingParams(max_new_tokens=8, ignore_eos=True))
        during = used()
        workers = pipe.workers()
        weight_bytes = sum(p.numel() * p.element_size() for p in pipe._engine.model.parameters())
        procs = per_process()
    increase = during - before
    _write(out, "memory.json", {
        "model": model, "weight_bytes": weight_bytes, "kv_pool_bytes": pool_bytes,
        "device_memory_increase_bytes": increase,
        "increase_minus_pool_over_weights": (increase - pool_bytes) / weight_bytes,
        "per_process_used_bytes": procs, "workers": workers,
        "note": "each of the 5 processes also holds a CUDA context (~0.5 GiB); 5 weight copies "
                "would show as a ratio near 5 plus contexts",
    })  # fmt: skip


def stage_bench(suite: Suite, use_mps: bool) -> int:
    out, model = suite.out, suite.model
    # a run of its own each time: a second run the same day must not collide with the first
    name = f"{'bench-mps' if use_mps else 'bench-nomps'}-{time.strftime('%H%M%S')}"
    args = [
        sys.executable, "-m", "splitwiser", "bench", *(["--model", model] if model else []),
        "--dtype", "bfloat16",
        "--device", "cuda", "--procs", "4", "--mps" if use_mps else "--no-mps",
        "--workload", "azure-conv", "--num-requests", "64", "--length-scale", "0.5",
        "--max-context", "2048", "--trace-speedup", "4", "--slo", "ttft_ms=1000,tpot_ms=100",
        "--out", str(out), "--run-id", name,
    ]  # fmt: skip
    (out / f"{name}.command").write_text(" ".join(args[2:]).replace("-m splitwiser", "splitwiser"))
    return _child(args, out / f"{name}.run.log")


def stage_profile(suite: Suite, use_mps: bool) -> int:
    """Both phases under Nsight Compute; the summaries go to results/profile/. Under MPS ncu may
    refuse (its release notes list MPS as unsupported): the log then says so."""
    out, model = suite.out, suite.model
    name = f"{out.name}-{'mps' if use_mps else 'nomps'}"
    dest = ROOT / "results" / "profile" / name
    args = [
        sys.executable, "-m", "splitwiser", "profile", *(["--model", model] if model else []),
        "--dtype", "bfloat16", "--phase", "both", "--mps" if use_mps else "--no-mps",
        "--out", str(dest),
    ]  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    return _child(args, dest / "profile.log")


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
    args = ap.parse_args()
    on_cpu = args.device == "cpu" and args.stage in CPU_STAGES
    if args.stage != "env" and not on_cpu and not torch.cuda.is_available():
        print(f"gpu_suite: error: stage {args.stage!r} needs a CUDA GPU", file=sys.stderr)
        return 2
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    model = None if args.model == "default" else args.model
    suite = Suite(out, model, torch.device(args.device), args.small)
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
