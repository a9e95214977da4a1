"""MPS management on a host without a GPU: the missing binary is a clear error; against a test
double of the control binary (tests/fakes/), private 0700 directories, reuse of a running daemon
without ever stopping it, and no daemon left behind. Plus the environment each worker gets."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from splitwiser import ConfigError, SamplingParams, SplitwiserPipeline, mps
from tests.conftest import FAKES


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_missing_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mps, "_BINARY_DIRS", ())  # nor in the driver's usual folders
    assert mps.find_control_binary() is None and mps.find_running() is None
    with pytest.raises(mps.MPSUnavailableError, match="nvidia-cuda-mps-control not found"):
        mps.start_daemon()
    missing = str(tmp_path / "no-such-binary")  # an override that is not there hides the rest
    env = dict(os.environ, PATH=str(tmp_path), SPLITWISER_MPS_CONTROL=missing)
    proc = subprocess.run(
        [sys.executable, "-m", "splitwiser", "mps", "start"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("splitwiser: error: MPS is not available")


def test_private_daemon_dirs_are_0700_and_stop_leaves_nothing(fake_mps):
    daemon = mps.start_daemon()
    try:
        assert daemon.owned and daemon.pid is not None and psutil.pid_exists(daemon.pid)
        assert Path(daemon.root).parent == fake_mps
        for path in (daemon.root, daemon.pipe_dir, daemon.log_dir):
            assert _mode(path) == 0o700, path
        assert mps.daemon_responds(daemon.pipe_dir)
        assert daemon.env(70) == {
            "CUDA_MPS_PIPE_DIRECTORY": daemon.pipe_dir,
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "70",
        }
    finally:
        daemon.stop()
    assert not psutil.pid_exists(daemon.pid) or psutil.Process(daemon.pid).status() == "zombie"
    assert not Path(daemon.root).exists()


def test_a_running_daemon_is_used_and_never_stopped(fake_mps, monkeypatch):
    ours = mps.start_daemon()
    try:
        monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", ours.pipe_dir)
        found = mps.start_daemon()
        assert not found.owned and found.pipe_dir == ours.pipe_dir
        found.stop()  # not ours to stop: a no-op
        assert mps.daemon_responds(ours.pipe_dir) and psutil.pid_exists(ours.pid)
    finally:
        ours.stop()


def test_failed_start_is_one_clear_error_and_cleans_up(fake_mps, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL", "exclusive compute mode required")
    with pytest.raises(mps.MPSUnavailableError, match="did not start.*exclusive compute mode"):
        mps.start_daemon()
    assert not list(fake_mps.glob("splitwiser-mps-*"))


def test_cli_start_status_stop_stops_only_its_own(fake_mps, capsys):
    """``start`` and ``stop`` as real commands (the daemon outlives the command that started it;
    another command finds it through the record); status and the repeats in this process,
    through the command's own ``main`` (each reads the record again, as a new process would)."""
    from splitwiser.cli import main

    env = dict(os.environ)

    def command(*args):
        proc = subprocess.run([sys.executable, "-m", "splitwiser", "mps", *args],
                              capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def cli(*args):
        with pytest.raises(SystemExit) as exit_:
            main.main(["mps", *args])
        out, err = capsys.readouterr()
        assert exit_.value.code == 0, err
        return out

    assert "started the MPS control daemon" in command("start")
    recorded = mps.load_recorded()
    assert recorded is not None and recorded.owned
    assert psutil.pid_exists(recorded.pid) and mps.daemon_responds(recorded.pipe_dir)
    status = json.loads(cli("status", "--json"))
    assert status["started_by_splitwiser"]["running"] is True
    assert status["running"]["pipe_dir"] == recorded.pipe_dir
    assert "already runs" in cli("start")  # a second start reuses it
    assert mps.load_recorded().pipe_dir == recorded.pipe_dir
    assert "stopped" in command("stop")
    assert not mps.daemon_responds(recorded.pipe_dir) and mps.load_recorded() is None
    assert "nothing stopped" in cli("stop")
    assert not psutil.pid_exists(recorded.pid) or psutil.Process(recorded.pid).status() == "zombie"


def test_binary_found_off_path_and_through_the_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SPLITWISER_MPS_CONTROL", raising=False)
    monkeypatch.setattr(mps, "_BINARY_DIRS", (str(tmp_path / "nvidia" / "bin"),))
    binary = tmp_path / "nvidia" / "bin" / mps.CONTROL_BINARY
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert mps.find_control_binary() == str(binary)
    monkeypatch.setenv("SPLITWISER_MPS_CONTROL", str(Path(FAKES) / mps.CONTROL_BINARY))
    assert mps.find_control_binary() == str(Path(FAKES) / mps.CONTROL_BINARY)


def test_stop_never_kills_a_process_that_reused_the_daemons_pid(fake_mps):
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        # a record whose daemon died and whose pid now belongs to another program
        ghost = mps.MPSDaemon(str(fake_mps / "gone"), None, True, stranger.pid, None, 1.0)
        ghost.stop(timeout_s=0.5)
        assert stranger.poll() is None  # still running
    finally:
        stranger.kill()
        stranger.wait()


def test_split_parsing():
    assert mps.parse_split("70,30") == (70, 30)
    for bad in ("70", "0,50", "70,101", "a,b", "1,2,3"):
        with pytest.raises(ConfigError, match="two percentages"):
            mps.parse_split(bad)


def test_each_worker_gets_its_role_share_before_cuda(model_dirs, tmp_path, leftovers):
    with pytest.raises(ConfigError, match="needs mps_pipe_dir"):
        SplitwiserPipeline(model_dirs["llama"], device="cpu", mps_thread_percentage=(70, 30))
    with pytest.raises(ConfigError, match="two percentages"):
        SplitwiserPipeline(
            model_dirs["llama"], device="cpu", mps_pipe_dir="/x", mps_thread_percentage=(0, 30)
        )
    pipe_dir = str(tmp_path)
    with SplitwiserPipeline(
        model_dirs["llama"],
        device="cpu",
        num_prompt_workers=1,
        num_token_workers=2,
        mps_pipe_dir=pipe_dir,
        mps_thread_percentage=(70, 30),
    ) as pipe:
        envs = {name: w["mps_env"] for name, w in pipe.workers().items()}
        assert pipe.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].token_ids
    share = {"prompt": "70", "token": "30"}
    assert len(envs) == 3
    for name, env in envs.items():
        role = name.split("-")[1]
        assert env == {
            "CUDA_MPS_PIPE_DIRECTORY": pipe_dir,
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": share[role],
        }, name
    with SplitwiserPipeline(model_dirs["llama"], device="cpu") as pipe:
        assert all(w["mps_env"] == {} for w in pipe.workers().values())
    leftovers.assert_clean()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip path on hosts without a GPU")
def test_gpu_tests_skip_without_a_gpu():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/test_gpu.py"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    assert "passed" not in proc.stdout and "skipped" in proc.stdout
    assert "needs a CUDA GPU" in proc.stdout


@pytest.fixture
def fake_gpu(fake_mps, monkeypatch):
    """A GPU pretended: NVML sees one, and the MPS client check runs the CUDA client's test
    double (tests/fakes/cuda-client), which joins the fake daemon as a CUDA program would."""
    monkeypatch.setattr(mps, "gpu_present", lambda: True)
    monkeypatch.setattr(mps, "CLIENT_CHECK", [str(Path(FAKES) / "cuda-client")], raising=False)
    return fake_mps


def test_run_mps_session_owns_what_it_starts(fake_gpu, monkeypatch):
    """The MPS step of bench and profile, with a GPU pretended: the daemon it started is
    stopped; the caller's processes get ``daemon.env()`` and this process never joins;
    `auto` degrades with the daemon's reason, `on` fails with it."""
    with mps.session("on", "cuda") as (daemon, state):
        assert state["active"] and state["owned_daemon"] and daemon.owned
        assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert not mps.daemon_responds(daemon.pipe_dir) and not Path(daemon.root).exists()
    monkeypatch.setenv("FAKE_MPS_FAIL", "MPS not supported here")
    with mps.session("auto", "cuda") as (daemon, state):
        assert daemon is None and not state["active"]
        assert "MPS not supported here" in state["reason"]
    with pytest.raises(mps.MPSUnavailableError, match="--mps: .*MPS not supported here"):
        with mps.session("on", "cuda"):
            pass


def _client(daemon) -> subprocess.Popen:
    """A CUDA client (its test double) connected to ``daemon`` until its stdin closes."""
    proc = subprocess.Popen(
        [str(Path(FAKES) / "cuda-client")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=os.environ | daemon.env(), text=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "client ok\n"
    return proc


def test_stop_while_a_client_is_attached_neither_raises_nor_kills(fake_mps):
    """``quit`` waits for the daemon's clients: a stop that runs out of time says so and leaves
    the daemon running (killing it would strand its server and clients)."""
    daemon = mps.start_daemon()
    client = _client(daemon)
    try:
        t0 = time.monotonic()
        problem = daemon.stop(timeout_s=1.0)
        assert time.monotonic() - t0 < 5
        assert "did not quit" in problem and "client" in problem
        assert mps.daemon_responds(daemon.pipe_dir) and daemon.owned
    finally:
        client.stdin.close()
        client.wait(10)
    assert daemon.stop() is None  # the client gone, quit returns
    assert not mps.daemon_responds(daemon.pipe_dir) and not Path(daemon.root).exists()


def test_mps_is_active_only_when_a_client_really_connected(fake_gpu, monkeypatch):
    """Start-up runs a CUDA client under the daemon and asks the daemon for its servers while
    it runs; a daemon that answers but serves nobody is not MPS."""
    with mps.session("on", "cuda") as (daemon, state):
        assert state["active"] and state["client_check"]["server_pids"]
    cases = (("fail", "busy or unavailable"), ("no-mps", "no MPS server"))
    for behaviour, reason in cases:
        monkeypatch.setenv("FAKE_CUDA_CLIENT", behaviour)
        with mps.session("auto", "cuda") as (daemon, state):
            assert daemon is None and not state["active"], behaviour
            assert "no CUDA client could use the MPS daemon" in state["reason"]
            assert reason in state["reason"], state["reason"]
        with pytest.raises(mps.MPSUnavailableError, match=f"--mps: .*{reason}") as exc:
            with mps.session("on", "cuda"):
                pass
        assert "\n" not in str(exc.value)
        assert not list(fake_gpu.rglob("control"))  # the daemon started for the check stopped


def test_cli_start_checks_that_a_cuda_client_is_served(fake_gpu, monkeypatch, capsys):
    """`splitwiser mps start` runs the client check too: a daemon that serves nobody is
    stopped again and reported in one line (exit 2), never left recorded as usable."""
    from splitwiser.cli import main

    def cli(*args) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_:
            main.main(["mps", *args])
        out, err = capsys.readouterr()
        return exit_.value.code, out, err

    code, out, _ = cli("start")
    assert code == 0 and "a CUDA client ran under MPS" in out
    assert mps.load_recorded() is not None
    assert cli("stop")[0] == 0 and mps.load_recorded() is None
    for behaviour, reason in (("fail", "busy or unavailable"), ("no-mps", "no MPS server")):
        monkeypatch.setenv("FAKE_CUDA_CLIENT", behaviour)
        code, out, err = cli("start")
        assert code == 2 and err.count("\n") == 1, err
        assert "no CUDA client could use the MPS daemon" in err and reason in err
        assert "(stopped)" in err and mps.load_recorded() is None
        assert not list(fake_gpu.rglob("control"))  # the daemon it started is gone
    code, out, _ = cli("start", "--no-check")  # the operator's choice: no client run
    assert code == 0 and "a CUDA client ran" not in out
    assert cli("stop")[0] == 0


def test_cli_stop_with_a_client_attached_says_so_and_keeps_the_record(fake_mps, capsys):
    from splitwiser.cli import main

    def cli(*args) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_:
            main.main(["mps", *args])
        out, err = capsys.readouterr()
        return exit_.value.code, out + err

    assert cli("start")[0] == 0
    daemon = mps.load_recorded()
    client = _client(daemon)
    try:
        code, text = cli("stop", "--timeout", "0.5")
        assert code == 2 and "did not quit" in text and text.count("\n") == 1, text
        assert mps.daemon_responds(daemon.pipe_dir) and mps.load_recorded() is not None
    finally:
        client.stdin.close()
        client.wait(10)
    code, text = cli("stop")
    assert code == 0 and "stopped the MPS control daemon" in text
    assert not mps.daemon_responds(daemon.pipe_dir) and mps.load_recorded() is None
