"""Owned child processes, the generic part: the spawn context, Ctrl-C held while spawning, a
channel of two plain pipes whose sender never blocks, the stop ladder (ask, terminate, kill),
and the check for a main script without ``if __name__ == "__main__":``.

Used by the engine's workers (``procs``) and by the vLLM engine processes (``splitwiser.vllm``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing import process as mp_process
from multiprocessing import resource_tracker
from multiprocessing.reduction import ForkingPickler

import psutil
import torch.multiprocessing as mp  # registers the tensor reductions (shm / CUDA IPC)

from splitwiser.errors import ConfigError, WorkerStartupError

# NOTE: spawn, never a plain fork: CUDA cannot survive fork, and a forked child of a process that
# ran multi-threaded torch on CPU can deadlock in MKL / OpenMP.
CTX = mp.get_context("spawn")

# CPU workers start from a fork server instead: one process, started with the pipeline, that
# has imported torch, transformers and the worker's code and run nothing. A spawned worker spends
# about 5 s of CPU importing them, one forked from there next to none, so a pipeline starts and a
# lost worker is replaced in a fraction of the time. The fork server never touches CUDA; CUDA
# workers are still spawned (as vLLM's default), and SPLITWISER_WORKER_MULTIPROC_METHOD chooses
# (vLLM's VLLM_WORKER_MULTIPROC_METHOD).
# NOTE: a forked worker's parent is the fork server, which lives while any worker does: a worker
# notices its pipeline's death by the EOF on its pipe, not by a new parent pid.
FORKSERVER = mp.get_context("forkserver")
FORKSERVER_PRELOAD = ["splitwiser.runtime.forkserver_preload"]
START_METHODS = ("spawn", "forkserver")
START_METHOD_ENV = "SPLITWISER_WORKER_MULTIPROC_METHOD"

# a spawned child that re-ran an unguarded main script exits with this (sysexits' EX_CONFIG)
MAIN_GUARD_EXIT_CODE = 78
MAIN_GUARD_HINT = (
    'the main script builds a pipeline without an `if __name__ == "__main__":` guard: each '
    "spawned worker process re-runs the main script and would build a pipeline of its own. "
    "Build the pipeline, and run everything that uses it, under that guard"
)
TERMINATE_WAIT_S = 2.0  # after SIGTERM, before SIGKILL


def worker_context(device_type: str):
    """The multiprocessing context a worker on ``device_type`` is started with (see FORKSERVER)."""
    method = os.environ.get(START_METHOD_ENV) or ("forkserver" if device_type == "cpu" else "spawn")
    if method not in START_METHODS:
        raise ConfigError(
            f"{START_METHOD_ENV} must be one of {', '.join(START_METHODS)}, not {method!r}"
        )
    if method == "spawn":
        return CTX
    # takes effect when the fork server starts (start_worker_server); a no-op afterwards
    FORKSERVER.set_forkserver_preload(FORKSERVER_PRELOAD)
    return FORKSERVER


def start_worker_server(device_type: str) -> None:
    """Start the fork server now if workers on ``device_type`` fork from it: its imports then
    run while this process loads the model and allocates the pool. Ctrl-C is held as for a
    worker, which inherits the server's signal mask."""
    if worker_context(device_type) is FORKSERVER:
        from multiprocessing import forkserver

        with sigint_held():
            forkserver.ensure_running()


def forkserver_pid() -> int | None:
    """The fork server's pid while this process has one (it is a child, not a worker)."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)  # a CPython detail


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class InheritedFd:
    """A file descriptor of the parent that a child should get a duplicate of, as a spawned child
    inherits them: pickled into a ``Process``'s arguments, it arrives as the child's own fd."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _rebuild_fd, (reduction.DupFd(self.fd),)


def _rebuild_fd(dup) -> int:
    return dup.detach()


def is_bootstrapping() -> bool:
    """Whether this process is a spawned child still importing the parent's main script: the
    condition under which ``multiprocessing.spawn`` refuses to start a process."""
    return bool(getattr(mp_process.current_process(), "_inheriting", False))


def exit_if_bootstrapping() -> None:
    """Called before every spawn. In a child re-running an unguarded main script, end that
    child at once, silently, with ``MAIN_GUARD_EXIT_CODE``: the parent, seeing that code, raises
    one ``ConfigError`` naming the fix (``startup_error``), instead of every child printing
    multiprocessing's bootstrapping traceback."""
    if is_bootstrapping():
        os._exit(MAIN_GUARD_EXIT_CODE)  # no traceback, no atexit work for a pipeline never built


def startup_error(name: str, process) -> Exception:
    """The error for the child ``name`` that exited during start-up: a ``ConfigError`` naming
    the fix where it re-ran an unguarded main script, else a ``WorkerStartupError``."""
    process.join(5.0)  # its pipes close just before it can be reaped
    if process.exitcode == MAIN_GUARD_EXIT_CODE:
        return ConfigError(MAIN_GUARD_HINT)
    return WorkerStartupError(
        f"{name} exited during start-up (exit code {process.exitcode}); its error is printed above"
    )


@contextlib.contextmanager
def sigint_held():
    """Hold Ctrl-C while a child is spawned; the parent alone handles it, afterwards.

    The child inherits a blocked SIGINT through exec, so a Ctrl-C while it imports torch waits
    until the child ignores it. In the main thread, where Python raises KeyboardInterrupt, the
    handler is deferred too: an interrupt in the middle of ``start()`` would leave the child a
    truncated start-up message.
    """
    # NOTE: the first spawn also starts multiprocessing's resource tracker, whose own start
    # unblocks SIGINT on the way out, and with it the block below: start it beforehand
    resource_tracker.ensure_running()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    in_main = threading.current_thread() is threading.main_thread()
    caught = []
    if in_main:
        old_handler = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if in_main:
            signal.signal(signal.SIGINT, old_handler)
            if caught and callable(old_handler):
                old_handler(signal.SIGINT, None)  # deliver it now: KeyboardInterrupt


def start(process) -> None:
    """Start a ``CTX.Process``: not from an unguarded main script, and with Ctrl-C held.

    NOTE: keep its arguments small. They travel through a pipe the child reads only after its
    bootstrapping, and a child that exits then (the missing guard) leaves the parent a
    ``BrokenPipeError`` instead of an exit code once they exceed the pipe's 64 KiB: send bulk
    data over the ``Channel`` instead.
    """
    exit_if_bootstrapping()
    with sigint_held():
        process.start()


def stop(process, timeout_s: float, ask: Callable[[], None] | None = None) -> None:
    """End ``process``: ``ask`` it (e.g. send a shutdown message) and wait up to ``timeout_s``,
    then SIGTERM, then SIGKILL (which ends it even when stopped or stuck in a system call).
    Returns once it has ended; a process never started is left as it is."""
    if ask is not None and process.is_alive():
        ask()
        process.join(timeout_s)
    if process.is_alive():
        process.terminate()
        process.join(TERMINATE_WAIT_S)
    if process.is_alive():
        process.kill()
        process.join()


class Channel:
    """The parent's ends of two plain pipes to one child: ``conn`` receives what the child
    sends; ``send`` queues for a feeder thread, so the sender never blocks on a busy child.

    NOTE: two plain pipes, no multiprocessing.Queue: a Queue's named semaphores outlive a
    killed reader until its feeder thread notices, and that thread can block for good on a
    full pipe whose only other reader is the parent itself. One writer per pipe, no locks
    between processes: a killed child wedges nothing and leaves nothing behind.
    """

    def __init__(self, name: str):
        self.child_in, self._send_conn = CTX.Pipe(duplex=False)
        self.conn, self.child_out = CTX.Pipe(duplex=False)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.feeder = threading.Thread(target=self._feed, name=f"{name}-feeder", daemon=True)
        self.feeder.start()

    def close_child_ends(self) -> None:
        """After the child started: the parent keeps no copy of its ends, so a dead child means
        EOF on ``conn`` and EPIPE for the feeder at once."""
        self.child_in.close()
        self.child_out.close()

    def send(self, msg) -> None:
        # pickled here, so a message that cannot travel raises in the sender, not in the feeder
        self.send_bytes(bytes(ForkingPickler.dumps(msg)))

    def send_bytes(self, data: bytes) -> None:
        self._outbox.put(data)

    def _feed(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self._send_conn.send_bytes(data)
            except OSError:  # the child is gone; its death is noticed on the other pipe
                return

    def close(self) -> None:
        """Once the child has ended: stop the feeder and close every end."""
        # the reader is dead: a write in progress fails with EPIPE, so the feeder ends promptly
        self._outbox.put(None)
        self.feeder.join(5.0)
        for conn in (self._send_conn, self.conn, self.child_in, self.child_out):
            conn.close()
