"""CUDA Multi-Process Service (MPS): find the control binary, start a private daemon or use one
already running, hand client processes their environment, and stop only what was started here.

MPS lets the prompt and token workers' kernels run concurrently on one GPU instead of
time-slicing whole contexts. A CUDA process connects to the daemon named by
``CUDA_MPS_PIPE_DIRECTORY`` when CUDA initialises, so that variable (and a worker's
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) must be in its environment before it touches CUDA.
This module never changes GPU settings such as the compute mode; see ``mps/README.md``.

A daemon started by ``splitwiser mps start`` is recorded in a state file, so that a later
``splitwiser mps stop`` stops exactly that daemon and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from splitwiser.errors import ConfigError, SplitwiserError

CONTROL_BINARY = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
MPS_MODES = ("on", "off", "auto")


class MPSUnavailableError(SplitwiserError):
    """MPS was asked for but cannot run here (no GPU, no control binary, daemon failed)."""


# where driver packages and container images put the driver's utilities, when not on PATH
_BINARY_DIRS = ("/usr/bin", "/usr/local/nvidia/bin", "/usr/local/cuda/bin", "/opt/nvidia/bin")


_NOT_FOUND_WHERE = (
    f"looked on PATH and in {', '.join(_BINARY_DIRS)}; or set $SPLITWISER_MPS_CONTROL"
)


def find_control_binary() -> str | None:
    """``$SPLITWISER_MPS_CONTROL``, then PATH, then the driver's usual folders."""
    override = os.environ.get("SPLITWISER_MPS_CONTROL")
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which(CONTROL_BINARY)
    if found:
        return found
    for folder in _BINARY_DIRS:
        path = os.path.join(folder, CONTROL_BINARY)
        if os.access(path, os.X_OK):
            return path
    return None


def state_file() -> Path:
    """Where ``splitwiser mps start`` records the daemon it started."""
    base = os.environ.get("SPLITWISER_CACHE") or os.path.expanduser("~/.cache/splitwiser")
    return Path(base) / "mps-daemon.json"


def parse_split(text: str | None) -> tuple[int, int] | None:
    """``"70,30"`` -> active thread percentages of the prompt and token workers."""
    if text is None:
        return None
    try:
        split = tuple(int(p) for p in text.split(","))
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
        raise MPSUnavailableError(f"{CONTROL_BINARY} not found ({_NOT_FOUND_WHERE})")
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


_DAEMON_NAMES = {CONTROL_BINARY, CONTROL_BINARY[:15]}


def _daemon_pids() -> set[int]:
    """Running control daemons (``comm`` holds at most 15 characters of the name)."""
    pids = set()
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in _DAEMON_NAMES:
            pids.add(proc.pid)
    return pids


@dataclass
class MPSDaemon:
    """A control daemon in use: started here (``owned``) or found running."""

    pipe_dir: str
    log_dir: str | None
    owned: bool
    pid: int | None = None  # the daemon process, when started here
    root: str | None = None  # the private directory holding pipe/ and log/, when started here
    pid_started_at: float | None = None  # its create_time: a reused pid is someone else's

    def env(self, thread_percentage: int | None = None) -> dict[str, str]:
        """What a client process needs in its environment before CUDA starts."""
        env = {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir}
        if thread_percentage is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(thread_percentage)
        return env

    def status(self) -> dict:
        running = daemon_responds(self.pipe_dir)
        servers = []
        if running:
            out = _control(self.pipe_dir, "get_server_list").stdout.split()
            servers = [int(x) for x in out if x.isdigit()]
        return asdict(self) | {"running": running, "server_pids": servers}

    def _own_process(self) -> psutil.Process | None:
        """The daemon process started here, if it still runs (not a later process that was
        given the same pid)."""
        if self.pid is None:
            return None
        try:
            proc = psutil.Process(self.pid)
            same = self.pid_started_at is None or abs(proc.create_time() - self.pid_started_at) < 1
            return proc if same and proc.name() in _DAEMON_NAMES else None
        except psutil.NoSuchProcess:
            return None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Quit the daemon if it was started here; a daemon found running is left alone."""
        if not self.owned:
            return
        if daemon_responds(self.pipe_dir):
            _control(self.pipe_dir, "quit")
        proc = self._own_process()
        if proc is not None:
            try:
                proc.wait(timeout_s)
            except psutil.TimeoutExpired:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.owned = False


def find_running() -> MPSDaemon | None:
    """A responding daemon: the one recorded by ``splitwiser mps start``, the one named by
    ``$CUDA_MPS_PIPE_DIRECTORY``, or the system default (/tmp/nvidia-mps). Never owned."""
    candidates = []
    recorded = load_recorded()
    if recorded is not None:
        candidates.append(recorded.pipe_dir)
    candidates += [os.environ.get("CUDA_MPS_PIPE_DIRECTORY"), DEFAULT_PIPE_DIRECTORY]
    for pipe_dir in candidates:
        if pipe_dir and daemon_responds(pipe_dir):
            return MPSDaemon(pipe_dir, os.environ.get("CUDA_MPS_LOG_DIRECTORY"), owned=False)
    return None


def start_daemon(start_timeout_s: float = 10.0) -> MPSDaemon:
    """Use a daemon already running (see ``find_running``), or start a private one whose pipe
    and log directories have mode 0700; only a daemon started here comes back ``owned``."""
    if find_control_binary() is None:
        raise MPSUnavailableError(
            f"MPS is not available: {CONTROL_BINARY} not found ({_NOT_FOUND_WHERE}); it ships "
            f"with the NVIDIA driver utilities"
        )
    running = find_running()
    if running is not None:
        return running
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
            pid = started[0] if started else None
            return MPSDaemon(pipe, log, True, pid, root, _create_time(pid))
        time.sleep(0.1)
    detail = (result.stderr or result.stdout).strip().splitlines()
    control_log = Path(log) / "control.log"
    if control_log.exists():
        detail += control_log.read_text(errors="replace").strip().splitlines()
    for pid in _daemon_pids() - before:  # a daemon that came up but never answered
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(root, ignore_errors=True)
    raise MPSUnavailableError(
        f"the MPS control daemon did not start ({detail[-1] if detail else 'no answer'}); "
        f"check the GPU's compute mode (see mps/README.md)"
    )


def _create_time(pid: int | None) -> float | None:
    try:
        return psutil.Process(pid).create_time() if pid is not None else None
    except psutil.NoSuchProcess:
        return None


def record(daemon: MPSDaemon) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(daemon)) + "\n")


def load_recorded() -> MPSDaemon | None:
    """The daemon ``splitwiser mps start`` recorded, if the record exists."""
    try:
        return MPSDaemon(**json.loads(state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def stop_recorded() -> MPSDaemon | None:
    """Stop the daemon ``splitwiser mps start`` recorded; returns it, or ``None`` if none was."""
    daemon = load_recorded()
    if daemon is not None:
        daemon.stop()
        state_file().unlink(missing_ok=True)
    return daemon


def gpu_present() -> bool:
    """Whether NVML sees a GPU, asked without initialising CUDA in this process."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library
        return False


@contextlib.contextmanager
def session(mode: str, device: str):
    """MPS for one run in ``mode`` (on, off, auto) on ``device`` (auto, cpu, cuda): yields
    (daemon or None, state for the results) with this process's environment pointing at the
    daemon; afterwards the environment is restored and a daemon started here is stopped.
    Enter it before this process touches CUDA."""
    state = {"requested": mode, "active": False}
    if mode == "off":
        state["reason"] = "disabled"
        yield None, state
        return
    daemon, reason = None, None
    if device == "cpu" or not gpu_present():
        where = "cpu" if device == "cpu" else "a machine without one"
        reason = f"MPS needs a CUDA GPU; this run is on {where}"
    elif find_control_binary() is None:
        reason = f"{CONTROL_BINARY} not found ({_NOT_FOUND_WHERE})"
    else:
        try:
            daemon = start_daemon()
        except MPSUnavailableError as exc:
            reason = str(exc)
    if daemon is None:
        if mode == "on":
            raise MPSUnavailableError(f"--mps: {reason}; run with --no-mps or --mps auto")
        state["reason"] = f"not used: {reason}"
        yield None, state
        return
    saved = dict(os.environ)
    # this process and every process it starts join the daemon when they initialise CUDA
    os.environ.update(daemon.env())
    state |= {"active": True, "owned_daemon": daemon.owned, "pipe_dir": daemon.pipe_dir}
    try:
        yield daemon, state
    finally:
        os.environ.clear()
        os.environ.update(saved)
        daemon.stop()
