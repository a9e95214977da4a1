"""``splitwiser bench``: its options become one ``BenchConfig`` holding the Splitwiser
system's ``EngineConfig``, and bad options fail in one line with exit code 2 and start nothing
(in-process, through the command's ``main``; one in a real subprocess); end to end in a real
subprocess, a short run writes a valid summary, the per-request CSV and the plots."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from splitwiser import ConfigError, EngineConfig
from splitwiser.benchmark.config import BenchConfig, split_procs
from splitwiser.config import KV_HANDOFF_MODES, MODEL_IMPLS, PHASE_PRIORITIES
from tests.test_errors import assert_one_line_error, splitwiser_in_process

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHORT = ["--procs", "2", "--num-requests", "6", "--input-len", "24", "--output-len", "6"]


def bench(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitwiser", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class _Parsed(Exception):
    pass


def parse(monkeypatch, *args: str) -> BenchConfig:
    """The ``BenchConfig`` that ``splitwiser bench ARGS`` would run, without running it."""
    import splitwiser.benchmark
    from splitwiser.cli.bench import bench as command

    def capture(config, **_):
        raise _Parsed(config)

    monkeypatch.setattr(splitwiser.benchmark, "run_bench", capture)
    with pytest.raises(_Parsed) as parsed:
        command.main(list(args), standalone_mode=False)
    return parsed.value.args[0]


def test_engine_options_default_to_the_engine_config_and_its_choices():
    from splitwiser.cli.bench import bench as command

    options = {p.name: p for p in command.params}
    defaults = EngineConfig()
    for name in ("model", "device", "dtype", "kv_handoff", "model_impl", "phase_priority",
                 "max_num_batched_tokens"):  # fmt: skip
        assert options[name].default == getattr(defaults, name), name
    assert tuple(options["kv_handoff"].type.choices) == KV_HANDOFF_MODES
    assert tuple(options["model_impl"].type.choices) == MODEL_IMPLS
    assert tuple(options["phase_priority"].type.choices) == PHASE_PRIORITIES


def test_options_become_the_splitwiser_systems_engine_config(monkeypatch):
    config = parse(monkeypatch, "--procs", "5", "--prompt-procs", "2", "--kv-handoff", "copy",
                   "--model-impl", "transformers", "--phase-priority", "decode",
                   "--enforce-eager", "--device", "cpu", "--dtype", "bfloat16",
                   "--model", "random:opt-125m", "--num-requests", "7",
                   "--max-num-batched-tokens", "512", "--baseline", "colocated")  # fmt: skip
    assert config.engine == EngineConfig(
        model="random:opt-125m", num_prompt_workers=2, num_token_workers=3, device="cpu",
        dtype="bfloat16", kv_handoff="copy", model_impl="transformers", enforce_eager=True,
        phase_priority="decode", max_num_batched_tokens=512,
    )  # fmt: skip
    assert config.baselines == ("colocated",)
    assert config.procs == 5 and config.num_requests == 7
    recorded = config.to_dict()  # summary.json's "config": flat, the engine's fields included
    assert recorded["num_prompt_workers"] == 2 and recorded["kv_handoff"] == "copy"
    assert recorded["block_size"] == EngineConfig().block_size and recorded["procs"] == 5
    default = parse(monkeypatch)
    assert default == BenchConfig() and default.engine.num_prompt_workers == 2


def test_procs_split_into_prompt_and_token_workers():
    assert split_procs(4) == {"num_prompt_workers": 2, "num_token_workers": 2}
    assert split_procs(5) == {"num_prompt_workers": 2, "num_token_workers": 3}
    assert split_procs(5, 4) == {"num_prompt_workers": 4, "num_token_workers": 1}
    with pytest.raises(ConfigError, match="--procs must be an integer >= 2"):
        split_procs(1)
    for prompt_procs in (0, 3):
        with pytest.raises(ConfigError, match="at least one token worker"):
            split_procs(3, prompt_procs)


def test_a_system_spec_names_one_registered_system():
    from splitwiser.systems import KNOWN_BASELINES, SYSTEMS, get_system
    from splitwiser.systems.http import HTTPSystem

    assert KNOWN_BASELINES == (
        "sequential", "batched", "colocated", "vllm", "vllm-parallel", "vllm-split"
    )  # fmt: skip
    for name, system in SYSTEMS.items():
        assert get_system(name) is system
    for url in ("http://127.0.0.1:8000/v1", "https://example.com/v1"):
        assert get_system(url) is HTTPSystem
    for spec in ("tgi", "vllm-cpu", "HTTP://x", "", "Splitwiser"):
        with pytest.raises(ConfigError, match=f"unknown baseline {spec!r}"):
            get_system(spec)
    # what the sweep reads from the registry: whose phase log has mixed steps, which log phases
    assert [n for n, s in SYSTEMS.items() if s.has_mixed_steps] == ["colocated"]
    assert [n for n, s in SYSTEMS.items() if s.is_engine] == ["splitwiser", "colocated"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--procs", "0"], "--procs must be an integer >= 2"),
        (["--procs", "1"], "--procs must be an integer >= 2"),
        (["--procs", "4", "--prompt-procs", "4"], "at least one token worker"),
        (["--workload", "sharegpt"], "Invalid value for '--workload'"),
        (["--mps"], "--mps: MPS needs a CUDA GPU"),
        (["--mps", "--no-mps"], "not both"),
        (["--mps-split", "70"], "two percentages"),
        (["--no-mps", "--mps-split", "70,30"], "--mps-split needs MPS"),
        (["--rate", "0"], "--rate must be positive"),
        (["--rate", "2", "--trace-speedup", "2", "--workload", "azure-conv"], "not both"),
        (["--trace-speedup", "2"], "needs a trace workload"),
        (["--slo", "ttft=5"], "bad --slo entry"),
        (["--baseline", "tgi"], "unknown baseline 'tgi'"),
        (["--num-requests", "0"], "--num-requests must be"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--device", "cuda"], "no CUDA GPU is available"),
        (["--input-len", "9000"], "exceeds the context"),
        (["--workload", "azure-conv", "--length-scale", "inf"], "--length-scale must be finite"),
        (["--rate", "inf"], "--rate must be finite"),
        (["--num-requests", "99999999999999999999999"], "--num-requests must be at most"),
    ],
)
def test_bad_options_fail_in_one_line(args, message, leftovers, tmp_path):
    """In this process, through the command's own ``main``; the real process's exit code and
    stderr are the next test's."""
    result = splitwiser_in_process("bench", *args, "--out", str(tmp_path))
    assert_one_line_error(result.exit_code, result.stderr, message)
    assert list(tmp_path.iterdir()) == []  # no results written
    leftovers.assert_clean()


def test_unwritable_out_fails_before_any_work(leftovers):
    proc = bench(*SHORT, "--out", "/proc/forbidden", timeout=180)
    # one line: no progress bar ran, no system was built
    assert_one_line_error(proc.returncode, proc.stderr, "/proc/forbidden")
    assert proc.stderr.strip().startswith("splitwiser: error: cannot write results")
    leftovers.assert_clean()


@pytest.mark.parametrize(
    "args",
    [
        ["--output-len", "1", "--num-requests", "4", "--input-len", "16"],
        ["--workload", "azure-conv", "--num-requests", "3", "--length-scale", "1e-300"],
    ],
)
def test_one_token_outputs_are_a_valid_run(args, tmp_path, leftovers):
    """TPOT is undefined with one output token: reported as missing, plotted without it."""
    proc = bench("--procs", "2", *args, "--baseline", "none", "--out", str(tmp_path),
                 "--run-id", "one", "--num-warmup", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    sw = summary["systems"]["splitwiser"]
    assert sw["completed"] == sw["total_output_tokens"] and sw["failed"] == 0
    assert sw["median_tpot_ms"] is None and sw["median_ttft_ms"] > 0
    assert (tmp_path / "one" / "latency_cdf.png").read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["one"]
    leftovers.assert_clean()


def test_a_run_that_fails_while_writing_leaves_no_result_folder(tmp_path, monkeypatch):
    """Results are written into a hidden folder renamed at the end: a folder named like a run
    always holds a complete summary."""
    from splitwiser.benchmark import plots, run_bench

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "write_plots", broken)
    engine = EngineConfig(num_prompt_workers=1, num_token_workers=1)
    config = BenchConfig(engine=engine, num_requests=2, input_len=16, output_len=2, num_warmup=1,
                         baselines=(), out=str(tmp_path), run_id="r")  # fmt: skip
    with pytest.raises(RuntimeError, match="disk full"):
        run_bench(config, show=False)
    assert list(tmp_path.iterdir()) == []


def test_short_bench_writes_summary_csv_and_plots(tmp_path, leftovers):
    proc = bench(*SHORT, "--out", str(tmp_path), "--run-id", "e2e", "--slo", "ttft_ms=60000",
                 "--baseline", "sequential,batched,colocated")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "x colocated" in proc.stdout and "output tok/s" in proc.stdout  # the table
    assert re.search(r"tokens = splitwiser %\s+100\s+\d+\s+100\b", proc.stdout), proc.stdout
    run = tmp_path / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["command"].startswith("splitwiser bench --procs 2")
    assert set(summary["systems"]) == {"splitwiser", "sequential", "batched", "colocated"}
    assert set(summary["ratios"]) == {"sequential", "batched", "colocated"}
    assert summary["environment"]["mps"]["active"] is False
    assert summary["config"]["num_prompt_workers"] == 1
    assert summary["model"]["spec"] == "default (embedded)"
    assert summary["model"]["model_type"] == "llama" and summary["model"]["num_hidden_layers"] > 0
    assert summary["model"]["model_impl"] == "splitwiser"  # own model code for Llama
    phases = summary["systems"]["splitwiser"]["phases"]  # the measured run, without warm-up
    assert phases["prefill_tokens"] == 144  # every prompt token prefilled once
    assert phases["decode_tokens"] == 36 - 6  # the first token of each comes from prefill
    assert phases["prefill_tokens_per_s"] > 0 and phases["mean_decode_step_ms"] > 0
    source = summary["environment"]["source"]  # this checkout's commit
    assert source is None or len(source["commit"]) == 40
    for name, m in summary["systems"].items():
        assert (m["completed"], m["failed"]) == (6, 0), name
        assert m["total_output_tokens"] == 36 and m["total_input_tokens"] == 144
        assert m["output_throughput"] == pytest.approx(36 / m["duration"])
        assert m["request_goodput"] == pytest.approx(6 / m["duration"])  # a 60 s SLO holds
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            for stat in ("mean", "median", "p90", "p99"):
                assert m[f"{stat}_{key}"] > 0, (name, stat, key)
        assert m["telemetry"]["gpu"] is None and m["telemetry"]["processes"]["driver"]
    sw = summary["systems"]["splitwiser"]
    assert {"sw-prompt-0", "sw-token-0"} <= set(sw["telemetry"]["processes"])
    assert sw["median_handoff_ms"] > 0 and sw["kv_bytes_copied"] == 0
    assert sw["kv_bytes_not_moved"] == 144 * sw["kv_bytes_per_token"]
    # the pool's figure (stats()) and the baselines' (the model's shape) agree
    assert summary["systems"]["sequential"]["kv_bytes_per_token"] == sw["kv_bytes_per_token"]
    colocated = summary["systems"]["colocated"]  # one worker, both phases, the same engine
    assert colocated["kv_bytes_per_token"] == sw["kv_bytes_per_token"]
    assert set(colocated["telemetry"]["processes"]) == {"driver", "sw-colocated-0"}
    assert colocated["phases"]["prefill_tokens"] == 144 and colocated["phases"]["mixed_steps"] > 0
    assert "kv_bytes_not_moved" not in colocated  # nothing to move
    ratio = summary["ratios"]["sequential"]["output_throughput"]
    assert ratio == pytest.approx(
        sw["output_throughput"] / summary["systems"]["sequential"]["output_throughput"]
    )
    # greedy float32 on the same prompt ids: the split runtime reproduces generate() exactly
    agreement = summary["token_agreement_with_sequential"]
    assert agreement["splitwiser"] == agreement["colocated"] == 1.0
    same = summary["token_agreement_with_splitwiser"]
    assert same["sequential"] == same["colocated"] == 1.0 and "splitwiser" not in same
    with open(run / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {r["system"] for r in rows} == set(summary["systems"])
    assert all(int(r["num_output_tokens"]) == 6 and not r["error"] for r in rows)
    for png in ("latency_cdf.png", "throughput.png", "telemetry.png"):
        data = (run / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert set(summary["files"]) == {p.name for p in run.iterdir()}
    # each system ran in a process of its own (a killed worker's memory goes with it)
    pids = [m["pid"] for m in summary["systems"].values()]
    assert len(set(pids)) == 4
    leftovers.assert_clean()


def test_trace_replay_records_the_workload(tmp_path, leftovers):
    proc = bench(
        "--procs", "2", "--workload", "azure-conv", "--num-requests", "5",
        "--trace-speedup", "20", "--length-scale", "0.05", "--max-context", "256",
        "--baseline", "sequential", "--mps", "auto", "--no-plots", "--out", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    wl = summary["workload"]
    assert wl["arrival"] == "trace" and wl["trace_speedup"] == 20.0 and wl["length_scale"] == 0.05
    assert "Splitwise" in wl["attribution"]
    # the conversation trace's 2nd request comes 4.31 s after the 1st: 0.216 s at 20x
    with open(run / "requests.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["system"] == "splitwiser"]
    assert float(rows[1]["arrival_s"]) == pytest.approx(4.3145791 / 20, abs=1e-4)
    assert float(rows[1]["submit_s"]) >= float(rows[1]["arrival_s"])
    assert summary["environment"]["mps"]["reason"].startswith("not used")
    assert set(summary["systems"]) == {"splitwiser", "sequential"}
    assert not list(run.glob("*.png"))
    leftovers.assert_clean()


def _child_names(pid: int) -> list[str]:
    names = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            names.append(child.name())
        except psutil.NoSuchProcess:  # a short-lived helper process, gone already
            pass
    return names


def _wait_for_workers(pid: int, when: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        names = _child_names(pid)
        spawned = [n for n in names if n.startswith("python")] and len(names) >= 3
        if (when == "workers starting" and spawned) or "sw-token-1" in names:
            return
        time.sleep(0.05)
    pytest.fail(f"the workers never reached the '{when}' state")


def _start_long_bench(out) -> subprocess.Popen:
    """A bench long enough to be stopped midway, in a process group of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "splitwiser", "bench", "--out", str(out), "--num-requests",
         "200"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize("when", ["workers starting", "workers running"])
def test_ctrl_c_stops_everything_quietly(when, tmp_path, leftovers):
    """Ctrl-C reaches the whole process group: exit 130, one line, no worker traceback."""
    proc = _start_long_bench(tmp_path)
    try:
        _wait_for_workers(proc.pid, when)
        if when == "workers running":
            time.sleep(2.0)  # into the measured run
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the test failed before the interrupt: leave nothing running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "splitwiser: interrupted"
    leftovers.assert_clean()


def test_sigterm_to_the_run_alone_stops_the_system_process_too(tmp_path, leftovers):
    """SIGTERM reaches only the run's process: it passes the stop on to the system running in
    its own process at once, and every worker goes."""
    proc = _start_long_bench(tmp_path)
    try:
        _wait_for_workers(proc.pid, "workers running")
        t0 = time.monotonic()
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 25  # not a grace period meant for a Ctrl-C
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "splitwiser: terminated"
    leftovers.assert_clean()
