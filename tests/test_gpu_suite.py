"""The GPU suite's scripts stay runnable: both commands of the GPU plan (plan1, plan2) run small
on the CPU with the embedded model, their archive written again after every stage; the handoff
stage as a CPU smoke test; the GPU-only stages refuse clearly without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from fnmatch import fnmatch
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).parents[1]


def suite(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/gpu_suite.py", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )  # fmt: skip


def test_handoff_stage_runs_on_cpu(tmp_path, leftovers):
    proc = suite("handoff", "--device", "cpu", "--small", "--model", "default", "--out",
                 str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    handoff = json.loads((tmp_path / "handoff.json").read_text())["results"]
    assert set(handoff) == {"shared/16", "shared/64", "copy/16", "copy/64"}
    assert handoff["shared/64"]["kv_bytes_copied_per_request"] == 0
    assert handoff["copy/64"]["kv_bytes_copied_per_request"] > 0
    assert all(r["median_handoff_ms"] >= 0 for r in handoff.values())
    leftovers.assert_clean()


SMALL = ["--device", "cpu", "--small", "--model", "default"]


def _run_plan(plan: str, tmp_path) -> tuple[subprocess.CompletedProcess, list[set[str]]]:
    """``gpu_suite.sh <plan>`` small on the CPU; the archive's members each time it changed
    while the command ran, then at the end."""
    archive_dir = tmp_path / "evidence"
    env = dict(os.environ, GPU_SUITE_OUT=str(tmp_path / "out"))
    cmd = ["bash", str(ROOT / "bench" / "gpu_suite.sh"), plan, "--budget-s", "400",
           "--archive", str(archive_dir), *SMALL]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    seen, stamp = [], None
    while proc.poll() is None:
        for archive in archive_dir.glob("*.tar.gz"):
            if archive.stat().st_mtime_ns != stamp:
                stamp = archive.stat().st_mtime_ns
                with tarfile.open(archive) as tar:
                    seen.append(set(tar.getnames()))
        time.sleep(0.2)
    stdout = proc.stdout.read()
    (archive,) = archive_dir.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        seen.append(set(tar.getnames()))
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, ""), seen


def _json(tmp_path, pattern: str) -> dict:
    (path,) = (tmp_path / "out").glob(pattern)
    return json.loads(path.read_text())


def test_plan1_runs_small_and_archives_after_every_stage(tmp_path, leftovers):
    proc, seen = _run_plan("plan1", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    stages = ["env", "tests", "prefill", "bandwidth"]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("== ")
            and line.endswith("s)")] == stages  # fmt: skip
    assert proc.stdout.count("archive: ") == len(stages)
    # the archive held the env stage's results while the later stages still ran
    assert any("out/env.json" in names and "out/tests.json" not in names for names in seen)
    final = seen[-1]
    assert {f"out/{s}.log" for s in stages} <= final
    assert {"out/env.json", "out/tests.json", "out/prefill_bench.json",
            "out/decode_bench.json", "out/pytest-gpu-alone.log"} <= final  # fmt: skip
    tests = _json(tmp_path, "tests.json")
    assert tests["collected"] > 0 and tests["counts"] == {"PASSED": tests["collected"]}
    assert len(tests["logs"]) == 3 and tests["not_run"] == []  # two shards, then one alone
    prefill = _json(tmp_path, "prefill_bench.json")
    assert prefill["matmul"]["tflops"] > 0
    impls = {(p["impl"], p["mix"], p["batch_tokens"]) for p in prefill["points"]}
    assert {(i, m, t) for i in ("splitwiser", "transformers") for m in ("uniform", "mixed")
            for t in (32, 64)} == impls  # fmt: skip
    assert all(p["tokens_per_s"] > 0 and p["fraction_of_matmul"] > 0 for p in prefill["points"])
    compiled = prefill["compile_count"]
    assert compiled["fused"] and compiled["graphs_at_build"] > 0
    assert compiled["graphs_after_build"] == 0 and compiled["recompiled_at"] == []
    bw = _json(tmp_path, "decode_bench.json")
    steps = {(r["impl"], r["batch"], r["context"]) for r in bw["steps"]}
    for impl in ("splitwiser", "transformers", "hf-generate"):
        assert {(impl, b, c) for b in (1, 4) for c in (16, 64)} <= steps
    leftovers.assert_clean()


@pytest.mark.slow
def test_plan2_runs_small_and_archives_after_every_stage(tmp_path, leftovers):
    proc, seen = _run_plan("plan2", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("archive: ") == 3
    assert any(any(n.endswith("/summary.json") for n in names)
               and not any("sweep" in n for n in names) for names in seen)  # fmt: skip
    final = seen[-1]
    for run in ("bench-nomps-*", "bench-mps-*", "sweep-mps-*", "sweep-nomps-*"):
        assert any(fnmatch(n, f"out/{run}.command") for n in final), run
    for name in ("bench-nomps-*/summary.json", "bench-mps-*/summary.json"):
        summary = _json(tmp_path, name)
        assert summary["systems"]["splitwiser"]["completed"] == 2
    first, second = (
        _json(tmp_path, "sweep-mps-*/sweep.json"),
        _json(tmp_path, "sweep-nomps-*/sweep.json"),
    )
    assert set(first["systems"]) == set(second["systems"]) == {"splitwiser"}
    assert first["slo_reference"]["system"] == "splitwiser"
    # the second run (without MPS) judged by the SLOs the first resolved
    assert second["slo"] == pytest.approx(first["slo"], abs=1e-3)
    leftovers.assert_clean()


def test_a_stage_past_the_commands_budget_is_skipped_and_the_rest_archived(tmp_path):
    # env gets 61 - 30 s; tests would get what is left of it, under 30 s: skipped
    proc = _wrapper("env", "tests", "--budget-s", "61", "--archive", str(tmp_path / "a"), *SMALL,
                    tmp_path=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[gpu_suite.sh: tests skipped" in proc.stdout
    (archive,) = (tmp_path / "a").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        assert {"out/env.json", "out/tests.log"} <= set(tar.getnames())
    assert not (tmp_path / "out" / "tests.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on hosts without a GPU")
def test_gpu_stages_refuse_without_a_gpu(tmp_path):
    proc = suite("memory", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_suite: error: stage 'memory' needs a CUDA GPU"


def test_shell_wrapper_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_suite.sh")]).returncode == 0


def test_shell_wrapper_needs_stages_and_passes_options(tmp_path):
    sh = ["bash", str(ROOT / "bench" / "gpu_suite.sh")]
    env = {"PATH": "/usr/bin:/bin", "GPU_SUITE_OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    assert subprocess.run([*sh, "--help"], capture_output=True, env=env).returncode == 0
    none = subprocess.run(sh, capture_output=True, text=True, env=env)
    assert none.returncode == 2 and "name the stages to run" in none.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def _wrapper(*args, tmp_path, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_SUITE_OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), *args],
                          capture_output=True, text=True, env=env, timeout=240)  # fmt: skip


def test_archive_holds_what_the_command_wrote(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier.json").write_text("{}")  # an earlier command's result
    proc = _wrapper("env", "--archive", str(tmp_path / "evidence"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (archive,) = (tmp_path / "evidence").iterdir()
    assert archive.name.startswith("out-") and archive.name.endswith("-env.tar.gz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        info = json.load(tar.extractfile("out/env.json"))
    assert {"out/env.json", "out/env.log", "out/nvidia-smi.txt"} <= names
    assert "out/earlier.json" not in names
    assert info["torch"] == torch.__version__
    assert f"archive: {archive}" in proc.stdout


def test_every_stage_runs_under_a_time_limit(tmp_path):
    """A stage that overruns (here: the full-size handoff stage on a CPU) is stopped at its
    limit with everything it started, and the command says so and fails."""
    marker = str(tmp_path / "out")
    t0 = time.monotonic()
    proc = _wrapper("handoff", "--device", "cpu", "--model", "default", tmp_path=tmp_path,
                    GPU_SUITE_LIMIT_S="6")  # fmt: skip
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[gpu_suite.sh: handoff stopped after 6 s]" in proc.stdout
    assert "stopped after 6 s" in (tmp_path / "out" / "handoff.log").read_text()
    deadline = time.monotonic() + 10
    while _suite_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _suite_processes(marker) == []


def _suite_processes(out: str) -> list[int]:
    """Processes still running with this suite run's output folder in their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("GPU_SUITE_OUT") == out and _running(proc.pid):
                found.append(proc.pid)
        except (psutil.Error, OSError):
            pass
    return found


def test_env_stage_records_what_it_finds(tmp_path):
    proc = suite("env", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "env.json").read_text())
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert info["mps"]["active"] is False and "needs a CUDA GPU" in info["mps"]["reason"]
        assert info["ncu"].startswith("unavailable: splitwiser profile needs an NVIDIA GPU")


def test_a_stage_past_its_time_is_stopped_with_its_log_kept(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    gpu_suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", gpu_suite)
    spec.loader.exec_module(gpu_suite)
    script = "import time, subprocess, sys; " \
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print('started', p.pid, flush=True); time.sleep(60)"  # fmt: skip
    rc = gpu_suite._child([sys.executable, "-c", script], tmp_path / "x.log", timeout_s=3)
    assert rc == 124
    log = (tmp_path / "x.log").read_text()
    assert "started" in log and "killed after 3 s" in log
    grandchild = int(log.split("started ")[1].split()[0])
    deadline = time.monotonic() + 5
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild)  # the whole group was stopped, not just the child


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie awaits its reaper
    except psutil.NoSuchProcess:
        return False
