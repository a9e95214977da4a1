"""The GPU suite's script stays runnable: its handoff and bandwidth stages as a CPU smoke test
(small sizes, the embedded model), and the other stages refuse clearly without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
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


def test_handoff_and_bandwidth_stages_run_on_cpu(tmp_path, leftovers):
    for stage in ("handoff", "bandwidth"):
        proc = suite(
            stage, "--device", "cpu", "--small", "--model", "default", "--out", str(tmp_path)
        )
        assert proc.returncode == 0, proc.stderr
    handoff = json.loads((tmp_path / "handoff.json").read_text())["results"]
    assert set(handoff) == {"shared/16", "shared/64", "copy/16", "copy/64"}
    assert handoff["shared/64"]["kv_bytes_copied_per_request"] == 0
    assert handoff["copy/64"]["kv_bytes_copied_per_request"] > 0
    assert all(r["median_handoff_ms"] >= 0 for r in handoff.values())
    bw = json.loads((tmp_path / "decode_bench.json").read_text())
    assert bw["weight_bytes"] > 0 and bw["kv_bytes_per_token"] > 0
    steps = {(r["impl"], r["batch"], r["context"]) for r in bw["steps"]}
    for impl in ("splitwiser", "transformers", "hf-generate"):
        assert {(impl, b, c) for b in (1, 4) for c in (16, 64)} <= steps
    assert all(r["step_ms"] > 0 and r["achieved_gb_s"] > 0 for r in bw["steps"])
    leftovers.assert_clean()


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
