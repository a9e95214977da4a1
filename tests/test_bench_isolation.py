"""Who talks to CUDA in a benchmark run, checked on a host without a GPU against test doubles
of the MPS daemon and of CUDA's connection to it (tests/fakes/): each system runs in a process
of its own, so the run's process, which stops the daemon, never joined it (the daemon's ``quit``
waits for its clients), and memory a killed worker stranded in one system's process goes with
that process, not into the next system's."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from splitwiser import mps
from splitwiser.benchmark import BenchConfig, run_bench
from splitwiser.config import EngineConfig
from splitwiser.errors import SplitwiserError
from tests.conftest import FAKES

TWO_WORKERS = EngineConfig(num_prompt_workers=1, num_token_workers=1)  # device "auto"
SMALL = dict(num_requests=3, input_len=16, output_len=3, num_warmup=1, plots=False)


@pytest.fixture
def fake_cuda(fake_mps, monkeypatch):
    """A GPU pretended. Every Python process of the run (this one included) joins the fake
    daemon once CUDA_MPS_PIPE_DIRECTORY is in its environment, as a CUDA process would; the
    processes that joined are listed in the returned file."""
    monkeypatch.setattr(mps, "gpu_present", lambda: True)
    monkeypatch.setattr(mps, "CLIENT_CHECK", [str(Path(FAKES) / "cuda-client")], raising=False)
    joined = fake_mps / "joined.log"
    joined.touch()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([FAKES, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_CUDA_MPS", "1")
    monkeypatch.setenv("FAKE_CUDA_LOG", str(joined))
    spec = importlib.util.spec_from_file_location("fake_cuda", Path(FAKES) / "sitecustomize.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    stop = fake.watch()  # this process: the run's parent
    yield joined
    stop.set()


def test_under_mps_each_system_runs_in_its_own_process(fake_cuda, fake_mps, leftovers):
    out = fake_mps / "results"
    config = BenchConfig(engine=TWO_WORKERS, mps="on", out=str(out), run_id="mps", **SMALL)
    result = run_bench(config, show=False)
    summary = json.loads((out / "mps" / "summary.json").read_text())
    state = summary["environment"]["mps"]
    assert state["active"] and state["owned_daemon"] and state["client_check"]["server_pids"]
    assert "stop" not in state  # quit returned: the daemon's clients had all gone
    pids = {name: system["pid"] for name, system in summary["systems"].items()}
    assert set(pids) == {"splitwiser", "sequential", "batched"}
    assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
    joined = {int(line) for line in fake_cuda.read_text().split()}
    assert set(pids.values()) <= joined  # every system ran under the daemon
    assert os.getpid() not in joined  # the process that stops the daemon never joined it
    assert all(m["completed"] == 3 for m in summary["systems"].values())
    assert result.run_dir == out / "mps"
    assert not list(fake_mps.rglob("control"))  # the daemon it started is gone
    leftovers.assert_clean()


def test_auto_device_never_falls_back_to_cpu_because_mps_failed(fake_cuda, fake_mps, monkeypatch):
    """A GPU is present and torch is a CUDA build, but no client can join the daemon: MPS is
    left off and the run still goes to the GPU (here: a clear error, as the GPU is pretended)."""
    monkeypatch.setenv("FAKE_CUDA_CLIENT", "fail")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    out = fake_mps / "results"
    with pytest.raises(SplitwiserError, match="cuda"):
        run_bench(BenchConfig(engine=TWO_WORKERS, mps="auto", out=str(out), **SMALL), show=False)
    assert not out.exists() or list(out.iterdir()) == []
    assert not list(fake_mps.rglob("control"))
