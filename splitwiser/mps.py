"""CUDA Multi-Process Service (MPS): find the control binary, start a private daemon or use the
one already running, hand workers their environment, and stop only what was started here.

MPS lets the prompt and token workers' kernels run concurrently on one GPU instead of
time-slicing whole contexts. A CUDA process connects to the daemon named by
``CUDA_MPS_PIPE_DIRECTORY`` when CUDA initialises, so that variable (and a worker's
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) must be set before the process touches CUDA.
This module never changes GPU settings (compute mode); see ``mps/README.md``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from splitwiser.errors import ConfigError, SplitwiserError

CONTROL_BINARY = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
MPS_MODES = ("on", "off", "auto")


class MPSUnavailableError(SplitwiserError):
    """MPS was asked for but cannot run here (no GPU, no control binary, daemon failed)."""


def find_control_binary() -> str | None:
    return shutil.which(CONTROL_BINARY)


def parse_split(text: str | None) -> tuple[int, int] | None:
    """``"70,30"`` -> active thread percentages of the prompt and token workers."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        split = tuple(int(p) for p in parts)
    except ValueError:
        split = ()
    if len(split) != 2 or not all(1 <= p <= 100 for p in split):
        raise ConfigError(
            f"bad --mps-split {text!r}; give two percentages 1..100 for the prompt and token "
            f"workers, e.g. 70,30"
        )
    return split


def _control(pipe_dir: str, command: str, timeout_s: float = 10.0):
    """Send one command (``get_server_list``, ``quit``...) to the daemon on ``pipe_dir``."""
    binary = find_control_binary()
    if binary is None:
        raise MPSUnavailableError(f"{CONTROL_BINARY} not found on PATH")
    return subprocess.run(
        [binary],
        input=f"{command}\n",
        env=dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def daemon_responds(pipe_dir: str) -> bool:
    """Whether a control daemon listens on ``pipe_dir``."""
    if not (Path(pipe_dir) / "control").exists() or find_control_binary() is None:
        return False
    try:
        return _control(pipe_dir, "get_server_list", timeout_s=5.0).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _daemon_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == CONTROL_BINARY:
            pids.add(proc.pid)
    return pids


@dataclass
class MPSDaemon:
    """A control daemon in use: started here (``owned``) or found running."""

    pipe_dir: str
    log_dir: str
    owned: bool
    pid: int | None = None
    _tmp_root: str | None = None

    def env(self, thread_percentage: int | None = None) -> dict[str, str]:
        """What a client process needs in its environment before CUDA starts."""
        env = {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}
        if thread_percentage is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(thread_percentage)
        return env

    def status(self) -> dict:
        servers = None
        if daemon_responds(self.pipe_dir):
            out = _control(self.pipe_dir, "get_server_list").stdout.split()
            servers = [int(x) for x in out if x.isdigit()]
        return {
            "pipe_dir": self.pipe_dir,
            "owned": self.owned,
            "running": servers is not None,
            "server_pids": servers or [],
        }

    def stop(self, timeout_s: float = 10.0) -> None:
        """Quit the daemon if it was started here; a daemon found running is left alone."""
        if not self.owned:
            return
        if daemon_responds(self.pipe_dir):
            _control(self.pipe_dir, "quit")
        if self.pid is not None:
            try:
                proc = psutil.Process(self.pid)
                proc.wait(timeout_s)
            except psutil.NoSuchProcess:
                pass
            except psutil.TimeoutExpired:
                proc.kill()
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)
        self.owned = False


def start_daemon(pipe_dir: str | None = None, start_timeout_s: float = 10.0) -> MPSDaemon:
    """Use the daemon listening on ``pipe_dir`` (default: ``$CUDA_MPS_PIPE_DIRECTORY`` or
    /tmp/nvidia-mps), or start a private one with pipe and log directories of mode 0700."""
    if find_control_binary() is None:
        raise MPSUnavailableError(
            f"MPS is not available: {CONTROL_BINARY} is not on PATH (it ships with the NVIDIA "
            f"driver utilities); run without --mps, or with --mps auto"
        )
    existing = pipe_dir or os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_DIRECTORY)
    if daemon_responds(existing):
        log_dir = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
        return MPSDaemon(existing, log_dir, owned=False)
    root = tempfile.mkdtemp(prefix="splitwiser-mps-")  # mode 0700
    pipe, log = os.path.join(root, "pipe"), os.path.join(root, "log")
    os.mkdir(pipe, 0o700)
    os.mkdir(log, 0o700)
    before = _daemon_pids()
    result = subprocess.run(
        [find_control_binary(), "-d"],
        env=dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe, CUDA_MPS_LOG_DIRECTORY=log),
        capture_output=True,
        text=True,
        timeout=start_timeout_s,
    )
    deadline = time.monotonic() + start_timeout_s
    while result.returncode == 0 and time.monotonic() < deadline:
        if daemon_responds(pipe):
            started = sorted(_daemon_pids() - before)
            return MPSDaemon(pipe, log, True, started[0] if started else None, root)
        time.sleep(0.1)
    detail = (result.stderr or result.stdout).strip().splitlines()
    control_log = Path(log) / "control.log"
    if control_log.exists():
        detail += control_log.read_text(errors="replace").strip().splitlines()
    shutil.rmtree(root, ignore_errors=True)
    raise MPSUnavailableError(
        f"the MPS control daemon did not start ({detail[-1] if detail else 'no answer'}); "
        f"check the GPU's compute mode (see mps/README.md)"
    )
