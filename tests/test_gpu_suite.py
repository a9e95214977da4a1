"""The GPU suite's script stays runnable: its handoff and bandwidth stages as a CPU smoke test
(small sizes, the embedded model), and the other stages refuse clearly without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    bw = json.loads((tmp_path / "bandwidth.json").read_text())
    assert bw["copy_bandwidth_gb_s"] > 0 and bw["weight_bytes"] > 0
    assert [d["batch"] for d in bw["decode"]] == [1, 4]
    assert all(d["achieved_gb_s"] > 0 for d in bw["decode"])
    assert all(p["achieved_tflop_s"] > 0 for p in bw["prefill"])
    leftovers.assert_clean()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on hosts without a GPU")
def test_gpu_stages_refuse_without_a_gpu(tmp_path):
    proc = suite("memory", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_suite: error: stage 'memory' needs a CUDA GPU"


def test_shell_wrapper_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_suite.sh")]).returncode == 0
