"""Owning worker processes: spawn, readiness handshake, shutdown message, join, terminate, kill."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from multiprocessing import resource_sharer, resource_tracker
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

import torch.multiprocessing as mp  # registers the tensor reductions (shm / CUDA IPC)

from splitwiser.engine import messages as m
from splitwiser.engine.worker import WorkerConfig, worker_main
from splitwiser.errors import WorkerStartupError

# NOTE: spawn, never fork: CUDA cannot survive fork, and a forked child running multi-threaded
# torch on CPU can deadlock in MKL.
_CTX = mp.get_context("spawn")


@contextlib.contextmanager
def _sigint_held():
    """Hold Ctrl-C while a worker is spawned; the parent alone handles it, afterwards.

    The child inherits a blocked SIGINT through exec, so a Ctrl-C while it imports torch waits
    until ``worker_main`` ignores it. In the main thread, where Python raises
    KeyboardInterrupt, the handler is deferred too: an interrupt in the middle of ``start()``
    would leave the child a truncated start-up message.
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


_PICKLE_LOCK = threading.Lock()


def _lent_fds() -> dict:
    """The resource sharer's table of lent fds (a CPython detail, stable since 3.4; without it
    nothing is tracked and nothing breaks)."""
    return getattr(resource_sharer._resource_sharer, "_cache", {})


def _pickle_shared(obj) -> tuple[bytes, set[int]]:
    """Pickle ``obj`` with its tensors as shared handles; also return the keys under which
    multiprocessing's resource sharer holds the file descriptors it lent (CPU shared memory).

    NOTE: a CPU storage pickled outside a spawn travels as a *duplicate* of its fd, parked in
    this process's resource sharer until the receiver fetches it. A worker killed before it
    unpickles never fetches: those fds would pin the weights and the pool for good. The keys
    let ``WorkerProc.stop`` close what was never fetched.
    """
    cache = _lent_fds()
    with _PICKLE_LOCK:  # keys registered meanwhile by another thread's pickling are not ours
        before = set(cache)
        data = bytes(ForkingPickler.dumps(obj))
        lent = set(cache) - before
    return data, lent


def _close_lent(keys: set[int]) -> None:
    cache = _lent_fds()
    for key in keys:
        entry = cache.pop(key, None)  # atomic: the sharer's thread pops a fetched one the same way
        if entry is not None:
            entry[1]()  # closes the duplicate fd


def _worker_entry(cfg: WorkerConfig, payload: bytes, in_conn, out_conn, parent_pid: int) -> None:
    """The child's entry point: ``worker_main``, silent when the parent is gone. A parent that
    died leaves its worker a broken pipe, a refused connection (the fds it lent) or an EOF:
    nothing a traceback would explain, and the parent is not there to read it."""
    try:
        worker_main(cfg, payload, in_conn, out_conn)
    except (OSError, EOFError, SystemExit) as exc:
        parent_gone = os.getppid() != parent_pid
        if isinstance(exc, SystemExit) and not parent_gone:
            raise
        if parent_gone or isinstance(exc, (BrokenPipeError, ConnectionError, EOFError)):
            os._exit(1)  # no traceback, no atexit work on behalf of a dead parent
        raise


class WorkerProc:
    """One worker process and its two channels, seen from the parent."""

    def __init__(self, cfg: WorkerConfig, model, kv_pool):
        self.cfg = cfg
        # the weights and the pool travel as shared handles (shm fds on CPU, CUDA IPC on GPU)
        payload, self._lent = _pickle_shared((model, kv_pool))
        # NOTE: two plain pipes, no multiprocessing.Queue: a Queue's named semaphores outlive a
        # killed reader until its feeder thread notices, and that thread can block for good on a
        # full pipe whose only other reader is the parent itself.
        child_in, self._send_conn = _CTX.Pipe(duplex=False)
        self.conn, child_out = _CTX.Pipe(duplex=False)
        self.process = _CTX.Process(
            target=_worker_entry,
            name=cfg.name,
            args=(cfg, payload, child_in, child_out, os.getpid()),
            daemon=True,  # never outlives the parent
        )
        with _sigint_held():
            self.process.start()
        # the parent keeps no copy of the child's ends: a dead child means EOF / EPIPE at once
        child_in.close()
        child_out.close()
        self.ready: m.ReadyMsg | None = None
        self.spawned_at = time.monotonic()
        self.load = 0  # prompt worker: batches in flight; token worker: live requests
        # when it last sent something, or was given work while idle: the liveness clock
        self.last_heard_at = self.spawned_at
        # a parent thread writes to the pipe, so the engine loop never blocks on a busy worker
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._feeder = threading.Thread(target=self._feed, name=f"{cfg.name}-feeder", daemon=True)
        self._feeder.start()

    @property
    def name(self) -> str:
        return self.cfg.name

    def send(self, msg) -> None:
        # pickled here, so a message that cannot travel raises in the sender, not in the feeder
        data, lent = _pickle_shared(msg)  # fds lent only by the copy handoff's K/V
        if lent:
            self._lent |= lent
            if len(self._lent) > 1024:  # forget those fetched long ago
                self._lent &= set(_lent_fds())
        self._outbox.put(data)

    def assign(self, num: int = 1) -> None:
        """Count work given to it; an idle worker's liveness clock starts now."""
        if self.load == 0:
            self.last_heard_at = time.monotonic()
        self.load += num

    def heard(self) -> None:
        self.last_heard_at = time.monotonic()

    def silent_s(self) -> float:
        return time.monotonic() - self.last_heard_at

    def _feed(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self._send_conn.send_bytes(data)
            except OSError:  # the worker is gone; its death is noticed on the other pipe
                return

    def age_s(self) -> float:
        return time.monotonic() - self.spawned_at

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        """SIGKILL: ends it even when stopped (SIGSTOP) or stuck in a system call."""
        self.process.kill()
        self.process.join()

    def stop(self, timeout_s: float) -> None:
        """Ask politely, then terminate, then kill; always release the channels. A worker still
        starting up (no ready message yet) holds nothing worth waiting for: terminated at once."""
        if self.process.is_alive() and self.ready is not None:
            self.send(m.ShutdownMsg())
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        # the reader is dead: a write in progress fails with EPIPE, so the feeder ends promptly
        self._outbox.put(None)
        self._feeder.join(5.0)
        self._send_conn.close()
        self.conn.close()
        self.process.close()
        _close_lent(self._lent)  # a worker killed before it unpickled never fetched them
        self._lent = set()


def wait_ready(workers: list[WorkerProc], timeout_s: float) -> None:
    """Block until every worker sent its ``ReadyMsg``; raise if one dies or the time runs out."""
    deadline = time.monotonic() + timeout_s
    pending = {w.conn: w for w in workers if w.ready is None}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(w.name for w in pending.values())
            raise WorkerStartupError(f"workers not ready after {timeout_s:.0f} s: {names}")
        sentinels = {w.process.sentinel: w for w in pending.values()}
        for obj in wait(list(pending) + list(sentinels), timeout=left):
            w = pending.get(obj) or sentinels[obj]
            if obj in pending and w.conn.poll():
                try:
                    msg = w.conn.recv()
                except EOFError:
                    msg = None
                if isinstance(msg, m.ReadyMsg):
                    w.ready = msg
                    del pending[w.conn]
                    continue
            if not w.process.is_alive():
                raise WorkerStartupError(
                    f"worker {w.name} exited during start-up (exit code {w.process.exitcode}); "
                    f"its error is printed above"
                )
