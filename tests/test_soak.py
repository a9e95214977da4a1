"""A short soak: thousands of requests of varied shapes through one pipeline, and no worker's
private memory may grow after the warm-up (bench/soak.py, run as users run it).

Shapes vary on purpose (prompt lengths, wave sizes, output lengths): every new batch shape is a
new oneDNN primitive, and with oneDNN's default cache bounds a prompt worker's private memory
grew by about a third within 3,000 requests (and a token worker's by 7-9%). The runs here are
as short as still shows that: with the default bounds (PRIMITIVE_CACHE_CAPACITY = 1024 in
splitwiser/layers/linear.py) the split run's workers grew by 5-11% after its warm-up, the
colocated worker by 27%, and both soaks failed.

The verdict (what grew, what else fails a soak, the exit status) is checked on samples made up
here: no run needed to see it fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import soak as soak_script

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
    "system, requests, warmup",
    [("splitwiser", 1500, 300), ("colocated", 1000, 250)],
    ids=["split", "colocated"],
)
def test_worker_memory_stays_flat_over_a_short_soak(tmp_path, leftovers, system, requests, warmup):
    proc, result = soak(
        tmp_path, "--system", system, "--requests", str(requests), "--warmup", str(warmup),
        "--sample-every", str(warmup // 2), "--max-growth", "0.05", *VARIED,
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


MIB = 1 << 20
WORKERS = ("parent", "splitwiser-colocated-0")


def _sample(requests: int, rss_anon_mib: float = 400, uss_mib: float = 500, threads: int = 20,
            fds: int = 30) -> dict:  # fmt: skip
    """One between-waves sample as ``soak()`` records it, every process alike."""
    figures = {"uss": int(uss_mib * MIB), "rss_anon": int(rss_anon_mib * MIB),
               "num_threads": threads, "num_fds": fds}  # fmt: skip
    return {"requests": requests, "t_s": float(requests), "procs": dict.fromkeys(WORKERS, figures)}


def _verdict(samples, *options: str, pid_changes=(), wrong=(), shutdown=()) -> dict:
    args = soak_script.parse_args(["--requests", "300", "--warmup", "100", *options])
    return soak_script.verdict(args, samples, list(pid_changes), list(wrong), list(shutdown),
                               10.0, 80.0)  # fmt: skip


def test_verdict_measures_growth_from_the_warm_up_sample_to_the_last():
    """Start-up growth before the warm-up does not count; growth after it does, per process and
    per figure, against --max-growth; so do threads and descriptors past --max-extra-handles."""
    samples = [_sample(50, rss_anon_mib=100), _sample(100), _sample(200), _sample(300)]
    samples[-1]["procs"]["splitwiser-colocated-0"] = {
        "uss": 500 * MIB, "rss_anon": 440 * MIB, "num_threads": 23, "num_fds": 30,
    }  # fmt: skip
    result = _verdict(samples)
    assert (result["warmup_requests"], result["last_requests"]) == (100, 300)
    assert [row["name"] for row in result["rows"]] == list(WORKERS)
    parent, worker = result["rows"]
    assert parent["rss_anon"] == (400 * MIB, 400 * MIB, 0.0)  # not from the 100 MiB at 50
    assert worker["rss_anon"] == (400 * MIB, 440 * MIB, pytest.approx(0.10))
    assert worker["num_threads"] == (20, 23)
    assert result["failures"] == [
        "splitwiser-colocated-0: rss_anon grew +10.0% (limit 5%)",
        "splitwiser-colocated-0: num_threads 20 -> 23",
    ]
    loose = _verdict(samples, "--max-growth", "0.2", "--max-extra-handles", "3")
    assert loose["failures"] == []


def test_verdict_fails_replaced_workers_wrong_outputs_and_an_unclean_stop():
    samples = [_sample(100), _sample(300)]
    samples[-1]["procs"]["splitwiser-colocated-1"] = samples[-1]["procs"]["parent"]
    wrong = [f"request {i}: 3 of 4 tokens, finish stop" for i in range(12)]
    result = _verdict(
        samples, pid_changes=[{"requests": 200, "pids": {"splitwiser-colocated-0": 77}}],
        wrong=wrong, shutdown=["the server exited with 1"],
    )  # fmt: skip
    assert result["failures"] == [
        "splitwiser-colocated-1: not present at the warm-up sample",
        "workers replaced by 200 requests: {'splitwiser-colocated-0': 77}",
        *(f"wrong output: {w}" for w in wrong[:10]),
        "wrong output: 2 more",
        "shutdown: the server exited with 1",
    ]


def test_soak_fails_when_memory_grows_past_the_limit(tmp_path, monkeypatch, capsys):
    """The verdict can fail: a limit no process can meet (growth of at most -100%); the table
    says FAIL, the JSON lists why, and the exit status is 1. Fed samples of a flat run."""
    samples = [_sample(100), _sample(200), _sample(300)]

    def flat_soak(args):
        assert args.max_growth == -1
        return soak_script.verdict(args, samples, [], [], [], 10.0, 80.0)

    monkeypatch.setattr(soak_script, "soak", flat_soak)
    out = tmp_path / "soak.json"
    argv = ["--system", "colocated", "--requests", "300", "--warmup", "100", "--sample-every",
            "100", "--max-growth", "-1", "--out", str(out)]  # fmt: skip
    assert soak_script.main(argv) == 1
    result = json.loads(out.read_text())
    assert any("grew" in f for f in result["failures"])
    assert len(result["failures"]) == 2 * len(WORKERS)  # USS and RssAnon of every process
    stdout = capsys.readouterr().out
    assert "FAIL" in stdout and "GROWS: parent: uss grew +0.0% (limit -100%)" in stdout
