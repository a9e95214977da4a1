"""``splitwiser profile`` without a GPU: the ncu command line, the CSV parser on the documented
sample of ncu's raw page (tests/fixtures/), the per-phase summary, NVTX ranges, and the errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitwiser import ConfigError, EngineConfig, mps, profiling
from splitwiser.profiling import (
    ProfileConfig,
    ProfilerError,
    find_tool,
    ncu,
    run_profile,
    summary_table,
    target_command,
)
from splitwiser.worker.main import WorkerConfig, for_attached_profiler, phase_range
from tests.conftest import FAKES
from tests.test_errors import assert_one_line_error, splitwiser_in_process

SAMPLE = (Path(__file__).parent / "fixtures" / "ncu_raw_sample.csv").read_text()


@pytest.fixture
def fake_tools(fake_mps, monkeypatch):
    """A GPU pretended, and the test doubles of ncu, the MPS control binary and a CUDA client."""
    monkeypatch.setattr(mps, "gpu_present", lambda: True)
    monkeypatch.setattr(mps, "CLIENT_CHECK", [os.path.join(FAKES, "cuda-client")])
    return fake_mps


def test_ncu_command_profiles_one_phase_in_every_process():
    target = ["python", "-m", "splitwiser.profiling.target"]
    cmd = ncu.ncu_command("/opt/ncu", "token", "/out/profile-token.ncu-rep", 300, "default", target)
    assert cmd[0] == "/opt/ncu" and cmd[-3:] == target
    joined = " ".join(cmd)
    assert "--target-processes all" in joined  # the workers are child processes
    assert "--nvtx --nvtx-include token/" in joined
    assert "--clock-control none" in joined and "--launch-count 300" in joined
    assert "--export /out/profile-token.ncu-rep --force-overwrite" in joined
    metrics = cmd[cmd.index("--metrics") + 1].split(",")
    for m in ("sm__throughput", "dram__throughput", "dram__bytes_read", "dram__bytes_write"):
        assert any(x.startswith(m) for x in metrics), m
    assert "--set" not in cmd


def test_metric_choices():
    assert ncu.metric_args("full")[:2] == ["--set", "full"]
    custom = ncu.metric_args("l1tex__t_bytes.sum, dram__bytes_read.sum")[1].split(",")
    assert custom[-1] == "l1tex__t_bytes.sum" and custom.count("dram__bytes_read.sum") == 1
    assert ncu.export_command("ncu", "r.ncu-rep") == [
        "ncu", "--import", "r.ncu-rep", "--csv", "--page", "raw", "--print-units", "base",
    ]  # fmt: skip


def test_raw_csv_parser_reads_the_sample():
    rows = ncu.parse_raw_csv(SAMPLE)
    assert [r.id for r in rows] == [0, 1, 2, 3, 4]  # the ==PROF== line and units row skipped
    assert [r.pid for r in rows] == [101, 101, 101, 202, 202]
    assert rows[0].name.startswith("sm90_xmma_gemm")
    assert rows[0].metrics[ncu.DRAM_READ] == 26_738_688  # thousands separators
    assert rows[0].metrics[ncu.DURATION] == 120_320
    assert ncu.OCCUPANCY not in rows[4].metrics  # "n/a"
    assert rows[0].metrics["launch__grid_size"] == 132  # launch attributes are numbers too
    assert not any("Push/Pop" in k for k in rows[0].metrics)  # the NVTX stack is text
    with pytest.raises(ValueError, match="header"):
        ncu.parse_raw_csv("==PROF== nothing profiled\n")


def test_raw_csv_parser_scales_units_and_reads_big_ids():
    text = "\n".join([
        '"ID","Process ID","Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum"',
        '"","","","usecond","Kbyte"',
        '"1,204","123,456","gemv","2.50","1,024"',
    ])  # fmt: skip
    (row,) = ncu.parse_raw_csv(text)
    assert (row.id, row.pid) == (1204, 123456)
    assert row.metrics[ncu.DURATION] == pytest.approx(2_500)  # ns
    assert row.metrics[ncu.DRAM_READ] == pytest.approx(1_024_000)  # bytes


def test_phase_summary_weights_by_duration():
    rows = ncu.parse_raw_csv(SAMPLE)
    prompt = ncu.summarize([r for r in rows if r.pid == 101])
    assert prompt["num_kernels"] == 3
    assert prompt["duration_ms"] == pytest.approx((120_320 + 9_680 + 119_680) / 1e6)
    sm = (120_320 * 88.12 + 9_680 * 18.05 + 119_680 * 87.88) / (120_320 + 9_680 + 119_680)
    assert prompt["sm_throughput_pct"] == pytest.approx(sm)
    assert prompt["dram_bytes_read"] == 26_738_688 * 2 + 8_388_608
    top = prompt["top_kernels"][0]
    assert top["count"] == 2 and top["name"].startswith("sm90_xmma_gemm")
    assert top["share"] == pytest.approx((120_320 + 119_680) / 249_680)
    token = ncu.summarize([r for r in rows if r.pid == 202])
    assert token["dram_throughput_pct"] > token["sm_throughput_pct"]  # decode: memory-bound
    assert prompt["sm_throughput_pct"] > prompt["dram_throughput_pct"]  # prefill: compute-bound
    assert token["achieved_occupancy_pct"] == pytest.approx(47.10)  # only where collected


def _worker(role: str, device: str, nvtx: bool = False) -> WorkerConfig:
    return WorkerConfig(
        engine=EngineConfig(), device=device, model_impl="splitwiser", max_model_len=256,
        eos_token_ids=(), role=role, nvtx=nvtx,
    )  # fmt: skip


def test_nvtx_ranges_cost_nothing_when_off():
    cfg = _worker("token", "cpu")
    off = phase_range(cfg, torch.device("cpu"), "decode b=4")
    assert off is phase_range(cfg, torch.device("cpu"), "decode b=8")  # one shared no-op
    on_cpu = _worker("token", "cpu", nvtx=True)
    assert phase_range(on_cpu, torch.device("cpu"), "decode b=4") is off  # CUDA only


def test_nvtx_ranges_nest_phase_and_shape_on_cuda(monkeypatch):
    """``prompt`` > ``prefill b=4 t=2048``: what --nvtx-include "prompt/" selects. Also on when a
    profiler attached itself (NVTX_INJECTION64_PATH) without nvtx_ranges."""
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    monkeypatch.delenv("NVTX_INJECTION64_PATH", raising=False)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it here
    prompt = _worker("prompt", "cuda", nvtx=True)
    with phase_range(prompt, cuda, "prefill b=4 t=2048"):
        calls.append("kernels")
    assert calls == [("push", "prompt"), ("push", "prefill b=4 t=2048"), "kernels", ("pop",),
                     ("pop",)]  # fmt: skip
    token = _worker("token", "cuda")
    assert phase_range(token, cuda, "decode b=32") is phase_range(token, cuda, "decode b=1")
    assert for_attached_profiler(token) is token  # no profiler: unchanged
    monkeypatch.setenv("NVTX_INJECTION64_PATH", "/opt/nvidia/nsight/libToolsInjection64.so")
    calls.clear()
    with phase_range(for_attached_profiler(token), cuda, "decode b=32"):
        pass
    assert calls[:2] == [("push", "token"), ("push", "decode b=32")]


def test_target_command_and_config_errors(tmp_path):
    cmd = target_command(ProfileConfig(model="random:llama-3.2-1b"), tmp_path / "w.json")
    assert cmd[1:3] == ["-m", "splitwiser.profiling.target"]
    assert cmd[cmd.index("--model") + 1] == "random:llama-3.2-1b"
    for bad in ({"phase": "decode"}, {"kernels": 0}, {"tool": "perf"}, {"metrics": " "}):
        with pytest.raises(ConfigError):
            ProfileConfig(**bad)


def test_missing_profiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(mps, "gpu_present", lambda: True)  # pretend a GPU, hide the tools
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SPLITWISER_NCU", raising=False)
    monkeypatch.setattr(profiling, "_INSTALL_GLOBS", {"ncu": (), "nsys": ()})
    with pytest.raises(ProfilerError, match=r"ncu \(Nsight Compute\) was not found on PATH"):
        find_tool("ncu")
    with pytest.raises(ProfilerError, match="nsys"):
        find_tool("nsys")
    monkeypatch.setenv("SPLITWISER_NCU", str(tmp_path / "nothing"))
    with pytest.raises(ProfilerError, match="SPLITWISER_NCU=.* is not an executable"):
        find_tool("ncu")


def test_profiler_found_off_path_newest_version_first(monkeypatch, tmp_path):
    """Installers put ncu under /opt/nvidia/nsight-compute/<version>/, often off PATH."""
    monkeypatch.setattr(mps, "gpu_present", lambda: True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("SPLITWISER_NCU", raising=False)
    for version in ("2024.3.2", "2025.3.1", "2025.10.0"):
        tool = tmp_path / "nsight-compute" / version / "ncu"
        tool.parent.mkdir(parents=True)
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    monkeypatch.setattr(
        profiling, "_INSTALL_GLOBS", {"ncu": (str(tmp_path / "nsight-compute" / "*" / "ncu"),)}
    )
    assert find_tool("ncu") == str(tmp_path / "nsight-compute" / "2025.10.0" / "ncu")


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")


@NO_GPU
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "needs an NVIDIA GPU"),
        (["--tool", "nsys", "--phase", "token"], "needs an NVIDIA GPU"),
        (["--kernels", "0"], "--kernels must be >= 1"),
        (["--phase", "decode"], "Invalid value for '--phase'"),
    ],
)
def test_cli_errors_without_a_gpu(args, message, tmp_path, leftovers):
    """In this process, through the command's own ``main``; in a real process below."""
    result = splitwiser_in_process("profile", *args, "--out", str(tmp_path / "p"))
    assert_one_line_error(result.exit_code, result.stderr, message)
    assert not (tmp_path / "p").exists()
    leftovers.assert_clean()


@NO_GPU
def test_cli_error_without_a_gpu_in_a_real_process(tmp_path, leftovers):
    proc = subprocess.run(
        [sys.executable, "-m", "splitwiser", "profile", "--out", str(tmp_path / "p")],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert_one_line_error(proc.returncode, proc.stderr, "needs an NVIDIA GPU")
    assert not (tmp_path / "p").exists()
    leftovers.assert_clean()


def test_run_profile_writes_reports_csv_and_per_phase_summary(fake_tools):
    """The orchestration around ncu (against its test double): one run and one export per
    phase, kernels attributed to phases by worker pid, MPS left off under ncu with ``auto``."""
    out = fake_tools / "prof"
    _, summary = run_profile(ProfileConfig(mps="auto", out=str(out)), command="splitwiser profile")
    assert summary["tool"]["name"] == "ncu" and summary["tool"]["version"] == "2025.3.1.0"
    assert summary["mps"]["requested"] == "auto" and not summary["mps"]["active"]
    assert "does not support profiling under MPS" in summary["mps"]["reason"]
    assert summary["phases"]["prompt"]["num_kernels"] == 3  # pid 101 only
    assert summary["phases"]["token"]["num_kernels"] == 2  # pid 202 only
    for phase in ("prompt", "token"):
        assert (out / f"profile-{phase}.ncu-rep").exists()
        assert ncu.parse_raw_csv((out / f"profile-{phase}.csv").read_text())
        assert "--nvtx-include" in (out / f"ncu-{phase}.log").read_text()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["phases"] == summary["phases"] and saved["command"] == "splitwiser profile"
    table = summary_table(summary)
    header, prompt_row = table.splitlines()[:2]
    for column in ("SM %", "DRAM %", "occupancy %", "DRAM read MB", "DRAM write MB", "time ms"):
        assert column in header
    written = summary["phases"]["prompt"]["dram_bytes_write"] / 1e6
    assert prompt_row.startswith("prompt") and f"{written:.1f}" in prompt_row
    assert "sm90_xmma_gemm" in table


def test_ncu_failing_under_mps_names_the_limitation(fake_tools, monkeypatch):
    monkeypatch.setenv("FAKE_NCU_FAIL_UNDER_MPS", "1")
    with pytest.raises(ProfilerError, match="does not support profiling under MPS.*--no-mps"):
        run_profile(ProfileConfig(mps="on", phase="token", out=str(fake_tools / "prof")))
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ  # the session ended
    assert not list(fake_tools.rglob("control"))  # and the daemon it started was stopped


def test_the_target_sizes_the_pool_to_its_workload(leftovers):
    """Not 30% of free device memory: ncu's replay saves all the memory a kernel can reach."""
    from splitwiser.profiling.target import workload_kv_blocks

    assert workload_kv_blocks(8, 512, 16) == 8 * 33  # 527 cached tokens each
    assert workload_kv_blocks(2, 16, 1) == 2
    proc = subprocess.run(
        [sys.executable, "-m", "splitwiser.profiling.target", "--device", "cpu",
         "--num-requests", "3", "--prompt-len", "20", "--output-len", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("KV pool 6 blocks")  # 3 x ceil(23 / 16)
    leftovers.assert_clean()
