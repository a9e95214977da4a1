"""The parent's side of one engine process: start it, wait until ready, talk to it, stop it."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable

from splitwiser.errors import WorkerStartupError
from splitwiser.vllm.engine_proc import EngineSpec, ErrorMsg, ReadyMsg, TokensMsg, engine_main

_CTX = multiprocessing.get_context("spawn")  # never fork: CUDA and OpenMP cannot survive it


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class EngineProcess:
    """One owned vLLM engine process. ``on_tokens`` runs on a reader thread for every
    ``TokensMsg``; ``on_death`` once if the process dies while open (with a one-line reason)."""

    def __init__(
        self,
        spec: EngineSpec,
        on_tokens: Callable[[TokensMsg], None],
        on_death: Callable[[str], None],
    ):
        self.spec = spec
        self._on_tokens, self._on_death = on_tokens, on_death
        self._inbox, self._outbox = _CTX.Queue(), _CTX.Queue()
        self._proc = _CTX.Process(
            target=engine_main,
            args=(spec, (os.getpid(), _in_main_thread()), self._inbox, self._outbox),
            name=spec.name,
            daemon=True,
        )
        self._closing = False
        self._reader: threading.Thread | None = None
        self.ready: ReadyMsg | None = None
        # NOTE: SIGINT held while spawning, so a Ctrl-C cannot kill the child half-started
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def wait_ready(self, timeout_s: float) -> ReadyMsg:
        """Block until the engine said ready; raises ``WorkerStartupError`` otherwise."""
        if self.ready is not None:
            return self.ready
        deadline = time.monotonic() + timeout_s
        while self.ready is None:
            try:
                msg = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise WorkerStartupError(
                        f"{self.spec.name} exited during start-up (exit code {self._proc.exitcode})"
                    ) from None
                if time.monotonic() > deadline:
                    raise WorkerStartupError(
                        f"{self.spec.name} was not ready within {timeout_s:.0f} s"
                    ) from None
                continue
            if isinstance(msg, ErrorMsg):
                raise WorkerStartupError(f"{self.spec.name} failed to start: {msg.message}")
            if isinstance(msg, ReadyMsg):
                self.ready = msg
        self._reader = threading.Thread(
            target=self._read, name=f"{self.spec.name}-reader", daemon=True
        )
        self._reader.start()
        return self.ready

    def send(self, msg) -> None:
        self._inbox.put(msg)

    def _read(self) -> None:
        reason = None
        while not self._closing:
            try:
                msg = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive() and not self._closing:
                    reason = f"exit code {self._proc.exitcode}"
                    break
                continue
            except (EOFError, OSError):
                reason = "its queue closed"
                break
            if isinstance(msg, TokensMsg):
                self._on_tokens(msg)
            elif isinstance(msg, ErrorMsg):
                reason = msg.message
        if not self._closing:
            self._on_death(f"{self.spec.name} died ({reason})")

    def close(self, timeout_s: float = 20.0) -> None:
        """Ask the engine to stop, then insist; never leaves the process behind."""
        self._closing = True
        if self._proc.pid is None:
            return
        if self._proc.is_alive():
            try:
                self._inbox.put(None)
            except (OSError, ValueError):
                pass
            self._proc.join(timeout_s)
        for stop in (self._proc.terminate, self._proc.kill):
            if self._proc.exitcode is not None:
                break
            stop()
            self._proc.join(5.0)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2.0)
        for q in (self._inbox, self._outbox):
            q.cancel_join_thread()
            q.close()
