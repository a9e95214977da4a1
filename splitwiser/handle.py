"""The caller's view of a submitted request: wait for it, or stream its tokens as they come."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from splitwiser.outputs import RequestOutput

log = logging.getLogger("splitwiser")

# (new token or None, its TokenLogprobs or None, the output once finished, the error once failed)
Listener = Callable[[int | None, object, RequestOutput | None, BaseException | None], None]


class RequestHandle:
    """Returned by ``submit``. Thread-safe; the engine thread fills it, the caller reads it."""

    def __init__(self, request_id: int, cancel=None):
        self.request_id = request_id
        self._cond = threading.Condition()
        self._tokens: list[int] = []
        self._logprobs: list = []  # per token: TokenLogprobs or None
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._cancel = cancel
        self._listener: Listener | None = None

    # ---- engine side
    def _push(self, token: int, logprobs=None) -> None:
        with self._cond:
            self._tokens.append(token)
            self._logprobs.append(logprobs)
            self._cond.notify_all()
            self._tell(token, logprobs, None, None)

    def _finish(self, output: RequestOutput) -> None:
        with self._cond:
            self._output = output
            self._cond.notify_all()
            if self._error is None:  # a failed request has had its end
                self._tell(None, None, output, None)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self._output is None and self._error is None:
                self._error = error
                self._cond.notify_all()
                self._tell(None, None, None, error)

    def _tell(self, token, logprobs, output, error) -> None:
        if self._listener is None:
            return
        try:
            self._listener(token, logprobs, output, error)
        except Exception:  # the engine thread goes on whatever a listener does
            log.exception("request %d: its listener failed", self.request_id)

    # ---- caller side
    def done(self) -> bool:
        with self._cond:
            return self._output is not None or self._error is not None

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for the request to finish; raises its error (a ``SplitwiserError``) if it failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._output or self._error, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
            if self._error is not None:
                raise self._error
            return self._output

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Yield generated token ids as they arrive; ends when the request finishes."""
        sent = 0
        while True:
            with self._cond:
                ok = self._cond.wait_for(
                    lambda n=sent: len(self._tokens) > n or self._output or self._error, timeout
                )
                if not ok:
                    raise TimeoutError(f"request {self.request_id}: no token within {timeout} s")
                if self._error is not None:
                    raise self._error
                new = self._tokens[sent:]
                finished = self._output is not None
            yield from new
            sent += len(new)
            if finished and sent >= len(self._tokens):
                return

    __iter__ = stream

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` for every event of this request, in order, from the engine thread:
        each new token ``(token, logprobs, None, None)``, then the end ``(None, None, output,
        None)`` or the failure ``(None, None, None, error)``; events that happened before are
        told at once, in this thread. It runs under the handle's lock, so it must only hand the
        event on (not block, not call back into the handle). One listener per handle; no thread
        is needed to follow it."""
        with self._cond:
            if self._listener is not None:
                raise RuntimeError(f"request {self.request_id} already has a listener")
            self._listener = listener
            for token, logprobs in zip(self._tokens, self._logprobs):
                self._tell(token, logprobs, None, None)
            if self._output is not None:
                self._tell(None, None, self._output, None)
            elif self._error is not None:
                self._tell(None, None, None, self._error)

    def cancel(self) -> None:
        """Stop generating; ``result()`` then returns what was generated (finish_reason "abort")."""
        if self._cancel is None or self.done():
            return
        self._cancel(self.request_id)
