"""A short soak: thousands of requests of varied shapes through one pipeline, and no worker's
private memory may grow after the warm-up (bench/soak.py, run as users run it).

Shapes vary on purpose (prompt lengths, wave sizes, output lengths): every new batch shape is a
new oneDNN primitive, and with oneDNN's default cache bounds a prompt worker's private memory
grew by about a third within these 3,000 requests (and a token worker's by 7-9%)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
VARIED = ["--prompt-len", "8:96", "--wave", "1:100", "--new-tokens", "1:16"]


def soak(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}  # fmt: skip
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "bench/soak.py", "--out", str(out), *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "system, requests", [("splitwiser", 3000), ("colocated", 2000)], ids=["split", "colocated"]
)
def test_worker_memory_stays_flat_over_a_short_soak(tmp_path, leftovers, system, requests):
    proc, result = soak(
        tmp_path, "--system", system, "--requests", str(requests), "--warmup", "500",
        "--sample-every", "250", "--max-growth", "0.05", *VARIED,
    )  # fmt: skip
    assert result["failures"] == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    names = {row["name"] for row in result["rows"]}
    expected = {"splitwiser-colocated-0"} if system == "colocated" else {
        "splitwiser-prompt-0", "splitwiser-prompt-1", "splitwiser-token-0", "splitwiser-token-1"
    }  # fmt: skip
    assert names == {"parent"} | expected
    assert result["last_requests"] == requests
    for row in result["rows"]:  # growth as the verdict computed it, from the raw samples too
        start, end, growth = row["rss_anon"]
        assert end <= start * 1.05 and growth <= 0.05, row
    leftovers.assert_clean()


@pytest.mark.slow
def test_server_and_worker_memory_stay_flat_over_a_short_http_soak(tmp_path, leftovers):
    """``splitwiser serve`` in a subprocess, the soak's requests through /v1/completions; after
    SIGTERM it must exit with 0 or 143 and leave no worker (the soak checks both)."""
    proc, result = soak(
        tmp_path, "--system", "serve", "--requests", "1500", "--warmup", "300",
        "--sample-every", "300", "--max-growth", "0.05",
    )  # fmt: skip
    assert result["failures"] == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    names = {row["name"] for row in result["rows"]}
    assert names == {"parent", "sw-prompt-0", "sw-prompt-1", "sw-token-0", "sw-token-1"}
    assert result["last_requests"] == 1500
    leftovers.assert_clean()


def test_soak_fails_when_memory_grows_past_the_limit(tmp_path, leftovers):
    """The verdict can fail: a limit no process can meet (growth of at most -100%)."""
    proc, result = soak(
        tmp_path, "--system", "colocated", "--requests", "300", "--warmup", "100",
        "--sample-every", "100", "--max-growth", "-1",
    )  # fmt: skip
    assert proc.returncode == 1
    assert any("grew" in f for f in result["failures"])
    assert "FAIL" in proc.stdout
    leftovers.assert_clean()
