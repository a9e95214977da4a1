"""Owning worker processes: spawn, readiness handshake, shutdown message, join, terminate, kill.

The generic plumbing (spawn context, channel, stop ladder, main-guard check) is ``spawn``'s;
this module adds the worker's payload and the fds lent to it."""

from __future__ import annotations

import os
import threading
import time
from multiprocessing import resource_sharer
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

import torch

from splitwiser.core import messages as m
from splitwiser.errors import WorkerStartupError
from splitwiser.runtime import spawn
from splitwiser.worker.main import WorkerConfig, worker_main

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


def _worker_entry(cfg: WorkerConfig, in_conn, out_conn, parent_pid: int, stdio) -> None:
    """The child's entry point: the parent's environment and stdout/stderr (a worker forked from
    the fork server has the server's, from when it started), the payload (the second message),
    then ``worker_main``; silent when the parent is gone. A parent that died leaves its worker a
    broken pipe, a refused connection (the fds it lent) or an EOF: nothing a traceback would
    explain, and the parent is not there to read it."""
    try:
        for target, fd in zip((1, 2), stdio):
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)
        env = in_conn.recv()
        os.environ.clear()
        os.environ.update(env)
        payload = in_conn.recv_bytes()
        worker_main(cfg, payload, in_conn, out_conn)
    except (OSError, EOFError, SystemExit) as exc:
        parent_gone = not spawn.process_alive(parent_pid)
        if isinstance(exc, SystemExit) and not parent_gone:
            raise
        if parent_gone or isinstance(exc, (BrokenPipeError, ConnectionError, EOFError)):
            os._exit(1)  # no traceback, no atexit work on behalf of a dead parent
        raise


class WorkerProc:
    """One worker process and its two channels, seen from the parent."""

    def __init__(self, cfg: WorkerConfig, model, kv_pool):
        self.cfg = cfg
        context = spawn.worker_context(torch.device(cfg.device).type)
        self._channel = spawn.Channel(cfg.name)
        self._feeder = self._channel.feeder  # a parent thread writes to the worker's pipe
        self.conn = self._channel.conn
        stdio = (spawn.InheritedFd(1), spawn.InheritedFd(2))
        self.process = context.Process(
            target=_worker_entry,
            name=cfg.name,
            args=(cfg, self._channel.child_in, self._channel.child_out, os.getpid(), stdio),
            daemon=True,  # never outlives the parent
        )
        self._lent: set[int] = set()
        try:
            spawn.start(self.process)  # a child re-running an unguarded script ends here
            self._channel.close_child_ends()
            self._channel.send(dict(os.environ))  # as a spawned child would inherit it
            # the weights and the pool travel as shared handles (shm fds on CPU, CUDA IPC on
            # GPU), after the environment: spawn arguments must stay small (see spawn.start)
            payload, self._lent = _pickle_shared((model, kv_pool))
            self._channel.send_bytes(payload)
        except BaseException:
            spawn.stop(self.process, 0.0)
            self._release()
            raise
        self.ready: m.ReadyMsg | None = None
        self.spawned_at = time.monotonic()
        # when it last sent something, or was given work while idle (the engine calls heard()
        # then): the liveness clock; what it owns is the core's (EngineCore.busy_workers)
        self.last_heard_at = self.spawned_at

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
        self._channel.send_bytes(data)

    def heard(self) -> None:
        self.last_heard_at = time.monotonic()

    def silent_s(self) -> float:
        return time.monotonic() - self.last_heard_at

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
        ask = None if self.ready is None else lambda: self.send(m.ShutdownMsg())
        spawn.stop(self.process, timeout_s, ask)
        self._release()

    def _release(self) -> None:
        """Once the process has ended (or never started)."""
        self._channel.close()
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
                # the missing main guard: a ConfigError naming the fix, raised here once
                raise spawn.startup_error(f"worker {w.name}", w.process)
