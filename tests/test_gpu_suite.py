"""The GPU suite's scripts stay runnable: the stages of both commands of the GPU plan (plan1,
plan2) run small on the CPU with the embedded model; the handoff stage as a CPU smoke test; the
GPU-only stages refuse clearly without a GPU. The shell wrapper's own mechanics (a plan's stages
in order, the archive written again after every stage, the command's budget, each stage's time
limit) run on stub stages that do no work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from fnmatch import fnmatch
from pathlib import Path

import psutil
import pytest
import torch

from bench import gpu_suite
from tests.test_bench_cli import parse as parse_bench

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
    assert all(r["median_handoff_ms"] > 0 for r in handoff.values())  # measured, not a default
    leftovers.assert_clean()


SMALL = ["--device", "cpu", "--small", "--model", "default"]
PLANS = {
    "plan1": ["env", "tests", "prefill", "bandwidth"],
    "plan2": ["bench-nomps", "bench-mps", "sweep"],
}

STUB_STAGE = """
import glob, json, os, subprocess, sys, tarfile, time

# Stands in for bench/gpu_suite.py: records its options and what the archive held as it started,
# writes <stage>.json; STUB_SLOW_STAGE takes STUB_SLOW_S first, STUB_HANG_STAGE never ends.
stage, options = sys.argv[1], sys.argv[2:]
out = options[options.index("--out") + 1]
held = []
for archive in glob.glob(os.path.join(os.environ.get("STUB_ARCHIVE", "-"), "*.tar.gz")):
    with tarfile.open(archive) as tar:
        held += tar.getnames()
if stage == os.environ.get("STUB_SLOW_STAGE"):
    time.sleep(float(os.environ["STUB_SLOW_S"]))
if stage == os.environ.get("STUB_HANG_STAGE"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("started", child.pid, flush=True)
    time.sleep(120)
with open(os.path.join(out, stage + ".json"), "w") as f:
    json.dump({"options": options, "archive_at_start": sorted(held)}, f)
"""


@pytest.fixture
def stub_wrapper(tmp_path) -> Path:
    """bench/gpu_suite.sh in a tree of its own, where bench/gpu_suite.py is STUB_STAGE."""
    bench = tmp_path / "tree" / "bench"
    bench.mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_suite.sh", bench / "gpu_suite.sh")
    (bench / "gpu_suite.py").write_text(STUB_STAGE)
    return bench / "gpu_suite.sh"


def _stub_record(tmp_path, stage: str) -> dict:
    return json.loads((tmp_path / "out" / f"{stage}.json").read_text())


def _archived(archive_dir) -> set[str]:
    (archive,) = archive_dir.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return set(tar.getnames())


@pytest.mark.parametrize("plan", PLANS)
def test_a_plan_runs_its_stages_and_archives_after_every_stage(plan, stub_wrapper, tmp_path):
    stages = PLANS[plan]
    archive_dir = tmp_path / "evidence"
    args = [plan, "--budget-s", "400", "--archive", str(archive_dir), *SMALL]
    proc = _wrapper(*args, tmp_path=tmp_path, script=stub_wrapper, STUB_ARCHIVE=str(archive_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    headers = [line.split() for line in proc.stdout.splitlines()
               if line.startswith("== ") and line.endswith("s)")]  # fmt: skip
    assert [h[1] for h in headers] == stages
    assert proc.stdout.count("archive: ") == len(stages)
    (archive,) = archive_dir.glob("*.tar.gz")
    assert archive.name.endswith(f"-{'+'.join(stages)}.tar.gz")

    def written(done: list[str]) -> set[str]:
        return {f"out/{s}.{ext}" for s in done for ext in ("log", "json")}

    assert _archived(archive_dir) == written(stages)
    for k, (stage, header) in enumerate(zip(stages, headers)):
        record = _stub_record(tmp_path, stage)
        # the archive as the stage started held every stage before it, and nothing of its own
        assert set(record["archive_at_start"]) == written(stages[:k]), stage
        options = record["options"]
        assert options[options.index("--limit-s") + 1] == header[3]  # "(limit N s)"
        assert options[4:] == SMALL  # the command's other arguments, to every stage


def test_plan1_stages_run_small_on_cpu(tmp_path, leftovers):
    """tests, prefill and bandwidth as plan1 runs them (env: below), each stage's function
    called here; the wrapper around them is the test above's."""
    suite = gpu_suite.Suite(tmp_path, None, torch.device("cpu"), small=True)
    for stage in PLANS["plan1"][1:]:
        assert gpu_suite.STAGES[stage](suite) == 0, stage
    assert {"tests.json", "prefill_bench.json", "decode_bench.json",
            "pytest-gpu-alone.log"} <= {p.name for p in tmp_path.iterdir()}  # fmt: skip
    tests = json.loads((tmp_path / "tests.json").read_text())
    assert tests["collected"] > 0 and tests["counts"] == {"PASSED": tests["collected"]}
    assert len(tests["logs"]) == 3 and tests["not_run"] == []  # two shards, then one alone
    prefill = json.loads((tmp_path / "prefill_bench.json").read_text())
    assert prefill["matmul"]["tflops"] > 0
    impls = {(p["impl"], p["mix"], p["batch_tokens"]) for p in prefill["points"]}
    assert {(i, m, t) for i in ("splitwiser", "transformers") for m in ("uniform", "mixed")
            for t in (32, 64)} == impls  # fmt: skip
    assert all(p["tokens_per_s"] > 0 and p["fraction_of_matmul"] > 0 for p in prefill["points"])
    compiled = prefill["compile_count"]
    assert compiled["fused"] and compiled["graphs_at_build"] > 0
    assert compiled["graphs_after_build"] == 0 and compiled["recompiled_at"] == []
    bw = json.loads((tmp_path / "decode_bench.json").read_text())
    steps = {(r["impl"], r["batch"], r["context"]) for r in bw["steps"]}
    for impl in ("splitwiser", "transformers", "hf-generate"):
        assert {(impl, b, c) for b in (1, 4) for c in (16, 64)} <= steps
    leftovers.assert_clean()


@pytest.mark.slow
def test_plan2_stages_run_small_on_cpu(tmp_path, monkeypatch, leftovers):
    """bench-nomps and sweep as plan2 runs them, each stage's function called here. On a CPU
    bench-mps is bench-nomps with another MPS option (auto: off without a GPU, as the trace
    replay of test_bench_cli.py runs it): its command line is parsed, not run again."""
    suite = gpu_suite.Suite(tmp_path, None, torch.device("cpu"), small=True)
    for stage in ("bench-nomps", "sweep"):
        assert gpu_suite.STAGES[stage](suite) == 0, stage

    def result(pattern: str) -> dict:
        (path,) = tmp_path.glob(pattern)
        return json.loads(path.read_text())

    assert result("bench-nomps-*/summary.json")["systems"]["splitwiser"]["completed"] == 2
    first, second = result("sweep-mps-*/sweep.json"), result("sweep-nomps-*/sweep.json")
    assert set(first["systems"]) == set(second["systems"]) == {"splitwiser"}
    assert first["slo_reference"]["system"] == "splitwiser"
    # the second run (without MPS) judged by the SLOs the first resolved
    assert second["slo"] == pytest.approx(first["slo"], abs=1e-3)
    leftovers.assert_clean()

    commands = []
    monkeypatch.setattr(gpu_suite, "_child", lambda args, log, limit_s: commands.append(args) or 0)
    assert gpu_suite.STAGES["bench-mps"](suite) == 0
    (command,) = commands
    assert command[1:4] == ["-m", "splitwiser", "bench"]
    config = parse_bench(monkeypatch, *command[4:])
    assert (config.mps, config.num_requests, config.baselines) == ("auto", 2, ())
    assert config.engine.device == "cpu" and config.run_id.startswith("bench-mps-")
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.iterdir()}
    for run in ("bench-nomps-*", "bench-mps-*", "sweep-mps-*", "sweep-nomps-*"):
        assert any(fnmatch(n, f"{run}.command") for n in written), run


def test_a_stage_past_the_commands_budget_is_skipped_and_the_rest_archived(stub_wrapper, tmp_path):
    # env starts with 61 - 30 s left (30 s if a second ticked meanwhile) and takes 2 s: tests
    # would get under 30 s, and is skipped
    proc = _wrapper("env", "tests", "--budget-s", "61", "--archive", str(tmp_path / "a"), *SMALL,
                    tmp_path=tmp_path, script=stub_wrapper, STUB_SLOW_STAGE="env",
                    STUB_SLOW_S="2.1")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[gpu_suite.sh: tests skipped" in proc.stdout
    assert {"out/env.json", "out/tests.log"} <= _archived(tmp_path / "a")
    assert not (tmp_path / "out" / "tests.json").exists()
    options = _stub_record(tmp_path, "env")["options"]
    assert options[options.index("--limit-s") + 1] in ("30", "31")  # cut from env's own 60 s


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on hosts without a GPU")
def test_gpu_stages_refuse_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "memory", "--out", str(tmp_path)])
    assert gpu_suite.main() == 2
    assert capsys.readouterr().err.strip() == "gpu_suite: error: stage 'memory' needs a CUDA GPU"
    assert list(tmp_path.iterdir()) == []


def test_shell_wrapper_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_suite.sh")]).returncode == 0


def test_shell_wrapper_needs_stages_and_passes_options(tmp_path):
    sh = ["bash", str(ROOT / "bench" / "gpu_suite.sh")]
    env = {"PATH": "/usr/bin:/bin", "GPU_SUITE_OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    assert subprocess.run([*sh, "--help"], capture_output=True, env=env).returncode == 0
    none = subprocess.run(sh, capture_output=True, text=True, env=env)
    assert none.returncode == 2 and "name the stages to run" in none.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def _wrapper(*args, tmp_path, script=ROOT / "bench" / "gpu_suite.sh", **env):
    env = dict(os.environ, GPU_SUITE_OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", str(script), *args],
                          capture_output=True, text=True, env=env, timeout=240)  # fmt: skip


def test_archive_holds_what_the_command_wrote(tmp_path):
    """The wrapper around the real gpu_suite.py: the env stage, and what it records."""
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
    assert f"archive: {archive}" in proc.stdout
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert info["mps"]["active"] is False and "needs a CUDA GPU" in info["mps"]["reason"]
        assert info["ncu"].startswith("unavailable: splitwiser profile needs an NVIDIA GPU")


def test_every_stage_runs_under_a_time_limit(stub_wrapper, tmp_path):
    """A stage that overruns (here: one that never ends, with a child of its own) is stopped
    at its limit with everything it started, and the command says so and fails."""
    marker = str(tmp_path / "out")
    t0 = time.monotonic()
    proc = _wrapper("handoff", *SMALL, tmp_path=tmp_path, script=stub_wrapper,
                    GPU_SUITE_LIMIT_S="3", STUB_HANG_STAGE="handoff")  # fmt: skip
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[gpu_suite.sh: handoff stopped after 3 s]" in proc.stdout
    log = (tmp_path / "out" / "handoff.log").read_text()
    assert "started" in log and "stopped after 3 s" in log
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


def test_a_stage_past_its_time_is_stopped_with_its_log_kept(tmp_path):
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
