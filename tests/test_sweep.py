"""``splitwiser sweep``: goodput, attainment and interference as pure logic on hand-made
records; the arrival schedules; bad options fail in one line with exit code 2 before any work;
and one short real sweep of Splitwiser and the colocated baseline on the CPU."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splitwiser import ConfigError
from splitwiser.benchmark.config import BenchConfig
from splitwiser.benchmark.goodput import (
    decode_step_stats,
    goodput_rps,
    interference,
    overlaps_prefill,
    slo_attainment,
)
from splitwiser.benchmark.metrics import RequestRecord
from splitwiser.benchmark.sweep import _schedules
from splitwiser.benchmark.sweep_config import SweepConfig, parse_rates, parse_sweep_slo
from splitwiser.benchmark.workloads import build_workload
from splitwiser.core.engine_core import PhaseRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(token_times, request_id=0, error=None) -> RequestRecord:
    return RequestRecord("s", request_id, 0.0, 8, len(token_times), 0.0, list(token_times),
                         token_times[-1] if token_times else None, error=error)  # fmt: skip


def step(kind, start, end, worker=("token", 0), n=1) -> PhaseRecord:
    return PhaseRecord(kind, worker, start, end, n)


# ------------------------------------------------------------------ goodput and attainment


def test_goodput_interpolates_between_the_last_rate_met_and_the_next():
    got = goodput_rps([1, 2, 4], [1.0, 0.95, 0.8])
    assert got["goodput_rps"] == pytest.approx(2 + (0.95 - 0.9) / (0.95 - 0.8) * 2)
    assert got["highest_rate_met"] is False
    # exactly on the target: that rate itself
    assert goodput_rps([1, 2, 4], [1.0, 0.9, 0.5])["goodput_rps"] == pytest.approx(2.0)


def test_attainment_exactly_at_the_target_meets_it():
    # 18 of 20 requests within the SLOs: 0.9, the target itself, counts as met
    records = [rec([0.1, 0.2], request_id=i) for i in range(18)]
    records += [rec([0.9, 1.0], request_id=18 + i) for i in range(2)]
    attainment = slo_attainment(records, {"ttft_ms": 500})
    assert attainment == 0.9
    assert goodput_rps([1, 2, 4], [0.85, attainment, 0.5])["goodput_rps"] == 2.0
    assert goodput_rps([1, 2], [1.0, attainment]) == {"goodput_rps": 2.0, "highest_rate_met": True}
    # a request exactly at an SLO's limit meets it
    assert slo_attainment([rec([0.25, 0.5])], {"ttft_ms": 250, "tpot_ms": 250}) == 1.0


def test_goodput_none_met_and_all_met():
    assert goodput_rps([1, 2, 4], [0.85, 0.5, 0.1]) == {
        "goodput_rps": None,
        "highest_rate_met": False,
    }
    assert goodput_rps([1, 2, 4], [1.0, 0.99, 0.91]) == {
        "goodput_rps": 4.0,
        "highest_rate_met": True,
    }
    # the highest rate that meets it, even past a dip
    assert goodput_rps([1, 2, 4, 8], [0.95, 0.85, 0.92, 0.5])["goodput_rps"] == pytest.approx(
        4 + (0.92 - 0.9) / (0.92 - 0.5) * 4
    )
    assert goodput_rps([1, 2], [1.0, 0.5], target=0.5)["goodput_rps"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        goodput_rps([2, 1], [1.0, 1.0])


def test_attainment_needs_every_slo_at_once_and_failed_requests_meet_none():
    fast = rec([0.1, 0.2, 0.3])  # TTFT 100 ms, TPOT 100 ms
    slow_first = rec([0.9, 0.95], request_id=1)  # TTFT 900 ms, TPOT 50 ms
    failed = rec([], request_id=2, error="WorkerCrashedError: boom")
    records = [fast, slow_first, failed]
    assert slo_attainment(records, {"ttft_ms": 500, "tpot_ms": 150}) == pytest.approx(1 / 3)
    assert slo_attainment(records, {"tpot_ms": 150}) == pytest.approx(2 / 3)
    assert slo_attainment(records, {"ttft_ms": 1000, "tpot_ms": 60}) == pytest.approx(1 / 3)
    assert slo_attainment(records, {"e2el_ms": 10_000}) == pytest.approx(2 / 3)
    assert slo_attainment([], {"ttft_ms": 1}) == 0.0


# ------------------------------------------------------------------ decode steps and interference


def test_split_interference_separates_decode_steps_overlapping_a_prefill():
    log = [
        step("prefill", 0.00, 0.10, ("prompt", 0), 256),
        step("prefill", 0.08, 0.15, ("prompt", 1), 256),  # overlaps the first: one busy span
        step("prefill", 0.50, 0.60, ("prompt", 0), 256),
        step("decode", 0.05, 0.07),  # inside
        step("decode", 0.14, 0.18),  # overlaps the end of the second prompt worker's batch
        step("decode", 0.20, 0.21),  # idle prompt workers
        step("decode", 0.45, 0.50),  # ends as a batch starts: no overlap
        step("decode", 0.60, 0.61, ("token", 1)),  # starts as it ends: no overlap
        step("decode", 0.40, 0.70, ("token", 1)),  # spans a whole batch
    ]
    flags = [overlapped for _, overlapped in overlaps_prefill(log)]
    assert flags == [True, True, False, False, False, True]
    got = interference(log, colocated=False)
    during, without = got["during_prefill"], got["without_prefill"]
    assert (during["num_steps"], without["num_steps"]) == (3, 3)
    assert during["mean_ms"] == pytest.approx((20 + 40 + 300) / 3)
    assert without["median_ms"] == pytest.approx(10)
    assert got["mean_ratio"] == pytest.approx(during["mean_ms"] / without["mean_ms"])
    stats = decode_step_stats(log, colocated=False)  # decode steps only, not prefill batches
    assert stats["num_decode_steps"] == 6 and stats["median_decode_step_ms"] == pytest.approx(30)


def test_colocated_interference_is_mixed_against_decode_only_steps():
    worker = ("colocated", 0)
    log = [step("mixed", 0.0, 0.04, worker, 512), step("decode", 0.04, 0.05, worker),
           step("decode", 0.05, 0.07, worker), step("mixed", 0.07, 0.13, worker, 100)]  # fmt: skip
    got = interference(log, colocated=True)
    assert got["during_prefill"]["num_steps"] == 2 and got["without_prefill"]["num_steps"] == 2
    assert got["during_prefill"]["mean_ms"] == pytest.approx(50)
    assert got["without_prefill"]["mean_ms"] == pytest.approx(15)
    assert got["mean_ratio"] == pytest.approx(50 / 15)
    # every colocated step advances the running requests
    assert decode_step_stats(log, colocated=True)["num_decode_steps"] == 4
    empty = interference([], colocated=True)
    assert empty["mean_ratio"] is None and empty["during_prefill"]["median_ms"] is None


# ------------------------------------------------------------------ schedules and parsing


def _sweep(**bench) -> SweepConfig:
    return SweepConfig(BenchConfig(slo={"ttft_ms": 100}, **bench), rates=(2.0, 8.0))


def test_poisson_schedules_are_the_bench_schedule_at_each_rate():
    config = _sweep(num_requests=20)
    base = build_workload("fixed", num_requests=20, input_len=8, output_len=4, rate=1.0,
                          trace_speedup=None, max_context=64, seed=0)  # fmt: skip
    for rate, requests in _schedules(config, base):
        bench = build_workload("fixed", num_requests=20, input_len=8, output_len=4, rate=rate,
                               trace_speedup=None, max_context=64, seed=0)  # fmt: skip
        assert [r.arrival_s for r in requests] == pytest.approx(
            [r.arrival_s for r in bench.requests]
        )


def test_trace_schedules_have_each_mean_rate():
    config = _sweep(workload="azure-conv", num_requests=10)
    trace = build_workload("azure-conv", num_requests=10, input_len=1, output_len=1, rate=None,
                           trace_speedup=1.0, max_context=256, seed=0)  # fmt: skip
    for rate, requests in _schedules(config, trace):
        assert (len(requests) - 1) / requests[-1].arrival_s == pytest.approx(rate)
        assert [r.prompt_len for r in requests] == [r.prompt_len for r in trace.requests]


def test_rates_and_slos_parse():
    assert parse_rates("1, 2.5,4") == (1.0, 2.5, 4.0)
    assert parse_sweep_slo("ttft_ms=500,tpot_ms=4x") == ({"ttft_ms": 500.0}, {"tpot_ms": 4.0})
    assert parse_sweep_slo("e2el_ms=2.5X") == ({}, {"e2el_ms": 2.5})
    bench = BenchConfig(slo={"ttft_ms": 1}, baselines=("colocated",))
    systems = SweepConfig(bench, rates=(1.0,)).systems
    assert {name: kind for name, (kind, _) in systems.items()} == {
        "splitwiser": "splitwiser",
        "colocated": "colocated",
    }
    with pytest.raises(ConfigError, match="increasing order"):
        SweepConfig(BenchConfig(slo={"ttft_ms": 1}), rates=(4.0, 2.0))


@pytest.fixture
def cli(monkeypatch, capsys):
    """``splitwiser ARGS`` in this process: (exit code, stderr lines); the CLI's SIGTERM
    handler is undone afterwards."""
    from splitwiser.cli import main

    previous = signal.getsignal(signal.SIGTERM)

    def run(*args):
        with pytest.raises(SystemExit) as exited:
            main.main(list(args))
        return exited.value.code, capsys.readouterr().err.strip().splitlines()

    yield run
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rate", "", "--slo", "ttft_ms=1"], "--rate needs at least one rate"),
        (["--rate", " , ", "--slo", "ttft_ms=1"], "--rate needs at least one rate"),
        (["--rate", "1,fast", "--slo", "ttft_ms=1"], "bad --rate value 'fast'"),
        (["--rate", "1,-2", "--slo", "ttft_ms=1"], "must be positive and finite, got -2"),
        (["--rate", "0", "--slo", "ttft_ms=1"], "must be positive and finite, got 0"),
        (["--rate", "1,nan", "--slo", "ttft_ms=1"], "must be positive and finite, got nan"),
        (["--rate", "4,2", "--slo", "ttft_ms=1"], "increasing order (2 after 4)"),
        (["--rate", "1,2,2", "--slo", "ttft_ms=1"], "--rate lists 2 twice"),
        (["--slo", "ttft_ms=1"], "Missing option '--rate'"),
        (["--rate", "1,2"], "--slo is required"),
        (["--rate", "1", "--slo", "ttft=5"], "bad --slo entry 'ttft=5'"),
        (["--rate", "1", "--slo", "ttft_ms=soon"], "bad --slo value 'soon'"),
        (["--rate", "1", "--slo", "ttft_ms=0x"], "bad --slo multiple '0x'"),
        (["--rate", "1", "--slo", "ttft_ms=5,ttft_ms=2x"], "--slo gives ttft_ms twice"),
        (["--rate", "1", "--slo", "ttft_ms=1", "--baseline", "tgi"], "unknown baseline 'tgi'"),
        (["--rate", "1", "--slo", "ttft_ms=1", "--baseline", "colocated,colocated"], "twice"),
        (["--rate", "1", "--slo", "ttft_ms=1", "--mps-split", "70"], "two percentages"),
        (["--rate", "1", "--slo", "ttft_ms=1", "--mps-split", "70,30", "--device", "cpu"],
         "--mps-split needs MPS on a CUDA GPU; this run is on cpu"),
        (["--rate", "1", "--slo", "ttft_ms=1", "--mps-split", "70,30", "--no-mps"],
         "--mps-split needs MPS"),
        (["--rate", "1", "--slo", "ttft_ms=1", "--input-len", "9000"], "exceeds the context"),
    ],
)  # fmt: skip
def test_bad_options_fail_in_one_line(cli, args, message, tmp_path, leftovers):
    code, lines = cli("sweep", *args, "--out", str(tmp_path))
    assert code == 2, lines
    assert len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("splitwiser: error:")
    assert list(tmp_path.iterdir()) == []  # no results written
    leftovers.assert_clean()


def test_a_bad_option_is_one_line_from_the_real_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "splitwiser", "sweep", "--rate", "2,1", "--slo", "ttft_ms=1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "splitwiser: error: --rate must list rates in increasing order (1 after 2)"
    )


# ------------------------------------------------------------------ a real sweep


def test_short_sweep_of_splitwiser_colocated_and_sequential(tmp_path, leftovers):
    """Each system up once for both rates: every request completes, greedy tokens agree with
    splitwiser's and with the sequential baseline's (``generate()``), and the files are written.
    The SLOs are generous: everything meets them, and Splitwiser's phase control (given the
    absolute TTFT and the TPOT multiple of its own single request) never steps."""
    proc = subprocess.run(
        [sys.executable, "-m", "splitwiser", "sweep", "--procs", "2", "--num-requests", "6",
         "--baseline", "colocated,sequential", "--phase-control", "slo",
         "--input-len", "24", "--output-len", "6", "--rate", "4,16", "--num-warmup", "1",
         "--slo", "ttft_ms=60000,tpot_ms=100x", "--out", str(tmp_path), "--run-id", "s"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "goodput req/s" in proc.stdout and "x colocated" in proc.stdout
    assert "tokens = splitwiser" in proc.stdout and "tokens = sequential" in proc.stdout
    run = tmp_path / "s"
    summary = json.loads((run / "sweep.json").read_text())
    assert summary["command"].startswith("splitwiser sweep --procs 2")
    assert summary["config"]["rates"] == [4.0, 16.0] and summary["workload"]["rates"] == [4, 16]
    reference = summary["slo_reference"]
    assert reference["system"] == "colocated" and reference["num_runs"] == 3
    assert summary["slo"]["tpot_ms"] == pytest.approx(100 * reference["tpot_ms"])
    systems = summary["systems"]
    assert list(systems) == ["splitwiser", "colocated", "sequential"]
    assert len({s["pid"] for s in systems.values()}) == 3  # each in a process of its own
    for name, system in systems.items():
        assert [p["rate"] for p in system["points"]] == [4.0, 16.0], name
        assert system["goodput_rps"] == 16.0 and system["highest_rate_met"] is True, name
        assert system["single_request"]["ttft_ms"] > 0
        for point in system["points"]:
            assert (point["completed"], point["failed"]) == (6, 0), name
            assert point["slo_attainment"] == 1.0
            assert point["request_goodput"] == pytest.approx(6 / point["duration"])
            assert point["total_output_tokens"] == 36 and point["p90_ttft_ms"] > 0
            if name != "sequential":  # the engine's systems: their workers' own step log
                assert point["phases"]["prefill_tokens"] == 6 * 24  # each prompt prefilled once
                assert point["median_decode_step_ms"] > 0 and point["interference"]["basis"]
    # greedy float32 on the same prompt ids: the same tokens from all three, at both rates
    agreement = {
        (name, ref): [p.get(f"token_agreement_with_{ref}") for p in system["points"]]
        for name, system in systems.items() for ref in ("splitwiser", "sequential")
    }  # fmt: skip
    assert agreement == {
        ("splitwiser", "splitwiser"): [None, None], ("splitwiser", "sequential"): [1.0, 1.0],
        ("colocated", "splitwiser"): [1.0, 1.0], ("colocated", "sequential"): [1.0, 1.0],
        ("sequential", "splitwiser"): [1.0, 1.0], ("sequential", "sequential"): [None, None],
    }  # fmt: skip
    assert summary["goodput_ratio_to_colocated"] == {
        "splitwiser": 1.0, "colocated": 1.0, "sequential": 1.0
    }  # fmt: skip
    own_tpot = systems["splitwiser"]["single_request"]["tpot_ms"]
    for point in systems["splitwiser"]["points"]:
        control = point["phase_control"]
        assert (control["start_level"], control["level"], control["steps"]) == (0, 0, [])
        assert control["ttft_slo_ms"] == 60000 and control["prefill_concurrency"] == 1
        assert control["tpot_slo_ms"] == pytest.approx(100 * own_tpot)
    assert not any("phase_control" in p for p in systems["colocated"]["points"])
    assert systems["colocated"]["phases"]["mixed_steps"] > 0
    assert systems["colocated"]["kv_bytes_per_token"] == systems["splitwiser"]["kv_bytes_per_token"]
    with open(run / "points.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["system"], float(r["rate"])) for r in rows] == [
        ("splitwiser", 4.0), ("splitwiser", 16.0), ("colocated", 4.0), ("colocated", 16.0),
        ("sequential", 4.0), ("sequential", 16.0),
    ]  # fmt: skip
    assert {r["token_agreement_with_sequential"] for r in rows} == {"1.0", ""}
    with open(run / "requests.csv") as f:
        requests = list(csv.DictReader(f))
    assert len(requests) == 36 and all(int(r["num_output_tokens"]) == 6 for r in requests)
    for png in ("attainment.png", "latency_vs_rate.png", "throughput_vs_rate.png",
                "phase_control.png"):  # fmt: skip
        assert (run / png).read_bytes().startswith(PNG_MAGIC)
    assert set(summary["files"]) == {p.name for p in run.iterdir()}
    leftovers.assert_clean()


def test_rejudging_a_committed_sweep_at_its_own_slos_gives_its_goodput():
    """``bench/rejudge_slo.py`` on a committed run, at the SLOs the run resolved: the same
    attainment per point and goodput per system as the run's ``sweep.json``."""
    run = Path(__file__).parent.parent / "results" / "20261208-azure-conv-cpu"
    summary = json.loads((run / "sweep.json").read_text())
    slo = ",".join(f"{k}={v!r}" for k, v in summary["slo"].items())
    proc = subprocess.run(
        [sys.executable, "bench/rejudge_slo.py", str(run / "requests.csv"), "--slo", slo],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == set(summary["systems"])
    for name, system in summary["systems"].items():
        goodput = system["goodput_rps"]
        assert f"goodput {'-' if goodput is None else f'{goodput:.2f}'}" in " ".join(
            lines[name].split()
        ), name
        for point in system["points"]:
            assert f"{point['rate']:g}:{100 * point['slo_attainment']:.0f}%" in lines[name]
