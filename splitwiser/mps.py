"""CUDA Multi-Process Service (MPS): find the control binary, start a private daemon or use one
already running, hand client processes their environment, and stop only what was started here.

MPS lets the prompt and token workers' kernels run concurrently on one GPU instead of
time-slicing whole contexts. A CUDA process connects to the daemon named by
``CUDA_MPS_PIPE_DIRECTORY`` when CUDA initialises, so that variable (and a worker's
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) must be in its environment before it touches CUDA.
This module never changes GPU settings such as the compute mode; see ``mps/README.md``.

A daemon that answers proves nothing about its server: ``session`` runs a tiny CUDA client
under it and asks the daemon for its servers while the client runs; only then is MPS in use.

The daemon's ``quit`` waits for its clients. So the process that stops a daemon must never be
one of them: ``session`` never points this process at the daemon; the processes that use CUDA
(a benchmark's systems, the profiler's target) get ``daemon.env()`` and end before the stop.

A daemon started by ``splitwiser mps start`` is recorded in a state file, so that a later
``splitwiser mps stop`` stops exactly that daemon and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
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

    def server_pids(self) -> list[int]:
        """The MPS servers the daemon runs (one while any client is connected)."""
        try:
            out = _control(self.pipe_dir, "get_server_list", timeout_s=5.0).stdout.split()
        except (subprocess.TimeoutExpired, OSError):
            return []
        return [int(x) for x in out if x.isdigit()]

    def status(self) -> dict:
        running = daemon_responds(self.pipe_dir)
        servers = self.server_pids() if running else []
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

    def stop(self, timeout_s: float = 10.0) -> str | None:
        """Quit the daemon if it was started here; a daemon found running is left alone.

        ``quit`` waits for the daemon's clients. If it does not return within ``timeout_s`` a
        client is still attached: the daemon is left running (killing it would strand its
        server and the client's work) and the returned text says so; ``None`` when stopped."""
        if not self.owned:
            return None
        if daemon_responds(self.pipe_dir):
            try:
                _control(self.pipe_dir, "quit", timeout_s=timeout_s)
            except subprocess.TimeoutExpired:
                return (
                    f"the MPS daemon on {self.pipe_dir} did not quit within {timeout_s:.0f} s: a "
                    f"client is still attached; it was left running (stop it later with "
                    f"'echo quit | CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir} {CONTROL_BINARY}')"
                )
        proc = self._own_process()
        if proc is not None:
            try:
                proc.wait(timeout_s)
            except psutil.TimeoutExpired:  # quit returned, so no client is left to strand
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.owned = False
        return None


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


def stop_recorded(timeout_s: float = 10.0) -> tuple[MPSDaemon | None, str | None]:
    """Stop the daemon ``splitwiser mps start`` recorded: (it or ``None`` if none was, what kept
    it from stopping or ``None``). A daemon that did not stop stays recorded."""
    daemon = load_recorded()
    if daemon is None:
        return None, None
    problem = daemon.stop(timeout_s)
    if problem is None:
        state_file().unlink(missing_ok=True)
    return daemon, problem


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


# a tiny CUDA program: it makes a context and runs a kernel, then stays connected (and its MPS
# server with it) until its stdin closes
CLIENT_CHECK = [
    sys.executable, "-c",
    "import sys, torch; x = torch.ones(1 << 20, device='cuda'); "
    "print('client ok', float((x * 2).sum()), flush=True); sys.stdin.read()",
]  # fmt: skip


def _read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> tuple[bool, str]:
    """Read the child's output until a line starts with ``marker``, it exits, or time is up."""
    deadline = time.monotonic() + timeout_s
    fd, text = proc.stdout.fileno(), ""
    while marker not in text:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False, text + f"\n(no answer within {timeout_s:.0f} s)"
        chunk = os.read(fd, 4096).decode(errors="replace")
        if not chunk:
            return False, text
        text += chunk
    return True, text


def check_client(daemon: MPSDaemon, timeout_s: float = 120.0) -> dict:
    """Run a CUDA client under ``daemon`` and, while it runs, ask the daemon for its servers.
    ``ok`` only if the client ran a kernel and the daemon served it."""
    proc = subprocess.Popen(
        CLIENT_CHECK, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=os.environ | daemon.env(),
    )  # fmt: skip
    try:
        ran, output = _read_until(proc, "client ok", timeout_s)
        servers = daemon.server_pids() if ran else []
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        output += proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
    if not ran:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        problem = f"the client failed: {lines[-1] if lines else f'exit {proc.returncode}'}"
    elif not servers:
        problem = "the client ran but no MPS server served it (get_server_list was empty)"
    else:
        problem = None
    return {"ok": problem is None, "server_pids": servers, "problem": problem,
            "output": output.strip()[-1000:]}  # fmt: skip


@contextlib.contextmanager
def session(mode: str, device: str):
    """MPS for one run in ``mode`` (on, off, auto) on ``device`` (auto, cpu, cuda): yields
    (daemon or None, state for the results); afterwards a daemon started here is stopped.

    MPS is used (``state["active"]``) only once a CUDA client connected to the daemon. This
    process never joins the daemon: give the processes that use CUDA ``daemon.env()``, and
    let them end inside the block. A stop that could not finish is recorded in
    ``state["stop"]``, never raised over the run's results."""
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
    if daemon is not None:
        check = check_client(daemon)
        state["client_check"] = {k: v for k, v in check.items() if k != "output"}
        if not check["ok"]:
            reason = f"no CUDA client could use the MPS daemon: {check['problem']}"
            daemon.stop()
            daemon = None
    if daemon is None:
        if mode == "on":
            raise MPSUnavailableError(f"--mps: {reason}; run with --no-mps or --mps auto")
        state["reason"] = f"not used: {reason}"
        yield None, state
        return
    state |= {"active": True, "owned_daemon": daemon.owned, "pipe_dir": daemon.pipe_dir}
    try:
        yield daemon, state
    finally:
        problem = daemon.stop()
        if problem:
            state["stop"] = problem
