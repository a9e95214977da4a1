"""The pipeline beside the event loop: started in a thread, its requests' tokens handed to the
loop as they come.

Each request's handle is drained by a small thread of its own (``RequestHandle.stream`` blocks)
that hands every token to the loop with ``call_soon_threadsafe``, into one ``asyncio.Queue``
per HTTP request (all its prompts and choices). A handler never blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from splitwiser.errors import SplitwiserError
from splitwiser.outputs import RequestOutput
from splitwiser.server.errors import Unavailable

log = logging.getLogger("splitwiser.serve")


@dataclass
class Step:
    """One choice's progress: a new token, its end, or both (the last token with its output)."""

    index: int  # the choice (prompts x n, in order)
    token: int | None  # None: the request ended without a new token
    output: RequestOutput | None = None  # set once the request finished
    error: BaseException | None = None  # the request failed

    @property
    def is_last(self) -> bool:
        return self.output is not None or self.error is not None


class Generation:
    """The requests of one HTTP request, their steps merged into one queue, in arrival order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handles: list, observer=None):
        self._loop = loop
        self._handles = handles
        self._observer = observer  # ServerMetrics: told from the drain threads (thread-safe)
        self._queue: asyncio.Queue[Step] = asyncio.Queue()
        for index, handle in enumerate(handles):
            name = f"splitwiser-serve-{handle.request_id}"
            args = (index, handle)
            threading.Thread(target=self._drain, args=args, name=name, daemon=True).start()

    def _put(self, step: Step) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, step)

    def _drain(self, index: int, handle) -> None:
        """In the request's thread: every token, the last one together with the output. Runs to
        the request's end even after the client left (it ends at once once cancelled)."""
        seen = self._observer or _NoObserver()
        seen.request_waiting()
        num_tokens = 0
        try:
            for token in handle.stream():
                num_tokens += 1
                if num_tokens == 1:
                    seen.request_running()
                # NOTE: the engine thread finishes a request right after pushing its last token,
                # so the output is nearly always there by now: the last chunk carries the reason
                output = handle.result() if handle.done() else None
                if output is not None and len(output.token_ids) == num_tokens:
                    self._put(Step(index, token, output))
                    break
                self._put(Step(index, token))
            else:
                output = handle.result()
                self._put(Step(index, None, output))
        except BaseException as exc:  # a SplitwiserError: the request failed
            seen.request_ended(num_tokens > 0, None)
            self._put(Step(index, None, error=exc))
        else:
            seen.request_ended(num_tokens > 0, output)

    async def steps(self) -> AsyncIterator[Step]:
        """Every step of every choice, until each choice ended."""
        remaining = len(self._handles)
        while remaining:
            step = await self._queue.get()
            remaining -= step.is_last
            yield step

    def cancel(self) -> None:
        """Abort every request still running (their blocks are freed at once)."""
        for handle in self._handles:
            handle.cancel()


class _NoObserver:
    def request_waiting(self) -> None:
        pass

    def request_running(self) -> None:
        pass

    def request_ended(self, was_running: bool, output: RequestOutput | None) -> None:
        pass


class PipelineBridge:
    """Owns the pipeline: builds it in a thread (the socket answers meanwhile), says whether it
    serves, submits, and closes it."""

    def __init__(self, factory: Callable[[], object]):
        self._factory = factory
        self.pipe = None
        self.error: BaseException | None = None  # the pipeline failed to start
        self.stopping = False
        self.max_model_len: int | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._start, name="splitwiser-serve-start")

    def start(self) -> None:
        self._thread.start()

    def _start(self) -> None:
        try:
            pipe = self._factory()
            self.max_model_len = pipe.stats()["max_model_len"]
            self.pipe = pipe
            log.info("pipeline ready: %s", ", ".join(pipe.workers()))
        except BaseException as exc:
            self.error = exc
            log.error("the pipeline failed to start: %s", exc)
        finally:
            self._started.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._started.wait(timeout)

    @property
    def tokenizer(self):
        return self._ready_pipe().tokenizer

    def state(self) -> tuple[bool, str]:
        """(serving, why not): ready and healthy, or "starting", "failed: ...", "stopping"."""
        if self.stopping:
            return False, "the server is shutting down"
        if self.error is not None:
            return False, f"the pipeline failed to start: {self.error}"
        if self.pipe is None:
            return False, "the pipeline is starting"
        stats = self.pipe.stats()
        if stats["health"] in ("failed", "closed"):
            return False, f"the pipeline is {stats['health']}: {stats['error']}"
        return True, "ok"

    def _ready_pipe(self):
        serving, why = self.state()
        if not serving:
            raise Unavailable(why)
        return self.pipe

    def stats(self) -> dict | None:
        return None if self.pipe is None else self.pipe.stats()

    def generate(self, prompts: list[tuple[list[int], object]], observer=None) -> Generation:
        """Submit every (token ids, SamplingParams) now; a rejected one cancels the others."""
        pipe = self._ready_pipe()
        handles = []
        try:
            for ids, params in prompts:
                handles.append(pipe.submit(ids, params))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return Generation(asyncio.get_running_loop(), handles, observer)

    def close(self) -> None:
        """Wait for a start still under way, then close the pipeline (workers first)."""
        self.stopping = True
        self._started.wait()
        if self.pipe is not None:
            try:
                self.pipe.close()
            except SplitwiserError as exc:
                log.error("closing the pipeline: %s", exc)
