"""The parent's side of one engine process: start it, wait until ready, talk to it, stop it.
The plumbing (spawn, the two-pipe channel, the stop ladder) is ``splitwiser.runtime.spawn``'s."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from splitwiser.core.messages import ShutdownMsg
from splitwiser.errors import WorkerStartupError
from splitwiser.runtime import spawn
from splitwiser.vllm.engine_proc import EngineSpec, engine_main
from splitwiser.vllm.messages import (
    EngineControlMsg,
    EngineControlReplyMsg,
    EngineErrorMsg,
    EngineReadyMsg,
    EngineTokensMsg,
)


class EngineProcess:
    """One owned vLLM engine process. ``on_tokens`` runs on a reader thread for every
    ``EngineTokensMsg``; ``on_death`` once if the process dies while open (a one-line reason)."""

    def __init__(
        self,
        spec: EngineSpec,
        on_tokens: Callable[[EngineTokensMsg], None],
        on_death: Callable[[str], None],
    ):
        self.spec = spec
        self._on_tokens, self._on_death = on_tokens, on_death
        self._channel = spawn.Channel(spec.name)
        parent = (os.getpid(), threading.current_thread() is threading.main_thread())
        self._proc = spawn.CTX.Process(
            target=engine_main,
            args=(spec, parent, self._channel.child_in, self._channel.child_out),
            name=spec.name,
            daemon=True,
        )
        self._closing = False
        self._reader: threading.Thread | None = None
        self.ready: EngineReadyMsg | None = None
        self._replies: queue.SimpleQueue = queue.SimpleQueue()  # EngineControlReplyMsg
        self._control_lock = threading.Lock()  # one control call at a time
        try:
            spawn.start(self._proc)  # a child re-running an unguarded script ends here
        except BaseException:
            self._channel.close()
            raise
        self._channel.close_child_ends()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def wait_ready(self, timeout_s: float) -> EngineReadyMsg:
        """Block until the engine said ready; raises ``WorkerStartupError`` otherwise (a
        ``ConfigError`` when it re-ran a main script without the ``__main__`` guard)."""
        if self.ready is not None:
            return self.ready
        conn = self._channel.conn
        deadline = time.monotonic() + timeout_s
        while self.ready is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerStartupError(f"{self.spec.name} was not ready within {timeout_s:.0f} s")
            if not wait([conn, self._proc.sentinel], timeout=left):
                continue
            if not conn.poll():  # the process ended and said nothing more
                raise spawn.startup_error(self.spec.name, self._proc)
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                raise spawn.startup_error(self.spec.name, self._proc) from None
            if isinstance(msg, EngineErrorMsg):
                raise WorkerStartupError(f"{self.spec.name} failed to start: {msg.message}")
            if isinstance(msg, EngineReadyMsg):
                self.ready = msg
        self._reader = threading.Thread(
            target=self._read, name=f"{self.spec.name}-reader", daemon=True
        )
        self._reader.start()
        return self.ready

    def send(self, msg) -> None:
        self._channel.send(msg)

    def control(self, op: str, timeout_s: float = 60.0):
        """Send an ``EngineControlMsg`` and wait for its answer's value (the engine answers
        between two steps)."""
        with self._control_lock:
            self.send(EngineControlMsg(op))
            try:
                reply = self._replies.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"{self.spec.name} did not answer {op!r}") from None
        return reply.value

    def _read(self) -> None:
        """Until the process ends: its pipe gives EOF once it is gone (the parent holds no copy
        of the other end), so no polling."""
        error = None
        while True:
            try:
                msg = self._channel.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, EngineTokensMsg):
                self._on_tokens(msg)
            elif isinstance(msg, EngineControlReplyMsg):
                self._replies.put(msg)
            elif isinstance(msg, EngineErrorMsg):
                error = msg.message
        if not self._closing:
            self._proc.join(1.0)
            reason = error or f"exit code {self._proc.exitcode}"
            self._on_death(f"{self.spec.name} died ({reason})")

    def close(self, timeout_s: float = 20.0) -> None:
        """Ask the engine to stop, then insist; never leaves the process behind."""
        self._closing = True
        if self._proc.pid is None:
            return
        spawn.stop(self._proc, timeout_s, ask=lambda: self.send(ShutdownMsg()))
        # the process is gone: the reader sees EOF
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2.0)
        self._channel.close()
