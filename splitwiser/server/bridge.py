"""The pipeline beside the event loop: started in a thread, its requests' tokens handed to the
loop as they come.

Each request's handle tells its events (``RequestHandle.subscribe``) from the engine thread into
one queue per HTTP request (all its prompts and choices). The loop is woken once for whatever
arrived for any request since it last looked (one engine step's tokens for every stream wake it
once, not once per stream or per token), and no thread is started per request. A handler never
blocks the loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

from splitwiser.errors import SplitwiserError
from splitwiser.outputs import RequestOutput, TokenLogprobs
from splitwiser.server.errors import Unavailable

log = logging.getLogger("splitwiser.serve")


@dataclass
class Step:
    """One choice's progress: a new token, its end, or both (the last token with its output)."""

    index: int  # the choice (prompts x n, in order)
    token: int | None  # None: the request ended without a new token
    output: RequestOutput | None = None  # set once the request finished
    error: BaseException | None = None  # the request failed
    logprobs: TokenLogprobs | None = None  # the token's, if asked for

    @property
    def is_last(self) -> bool:
        return self.output is not None or self.error is not None


class Waker:
    """Wakes the loop's waiting generations from other threads with one loop callback for all
    that had arrivals since the loop last looked (``call_soon_threadsafe`` writes to the loop's
    self-pipe: once per engine step, not once per stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._due: list[asyncio.Event] = []  # to set in the loop; [] when none is scheduled

    def wake(self, event: asyncio.Event) -> None:
        with self._lock:
            self._due.append(event)
            if len(self._due) > 1:
                return  # a callback is scheduled and has yet to run: it sets this one too
        try:
            self.loop.call_soon_threadsafe(self._set_due)
        except RuntimeError:  # the loop is closed: the server has gone, nobody reads this
            pass

    def _set_due(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for event in due:
            event.set()


class Generation:
    """The requests of one HTTP request, their steps merged into one queue, in arrival order."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handles: list,
        observer=None,
        waker: Waker | None = None,
    ):
        self._waker = waker or Waker(loop)  # the bridge's, shared by every generation
        self._handles = handles
        self._seen = observer or _NoObserver()  # ServerMetrics (thread-safe)
        self._arrived: deque[Step] = deque()  # appended by the engine thread, popped by the loop
        self._woken = asyncio.Event()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self.ended = False  # the batch given last is the last there is
        self._running = [False] * len(handles)  # each index is told by one thread at a time
        for _ in handles:
            self._seen.request_waiting()
        for index, handle in enumerate(handles):
            handle.subscribe(partial(self._arrive, index))

    def _arrive(self, index: int, token, logprobs, output, error) -> None:
        """In the engine thread (or here, for what happened before): count it in the metrics
        (also once nobody reads the answer any more), queue it, wake the loop once."""
        if token is not None and not self._running[index]:
            self._running[index] = True
            self._seen.request_running()
        if output is not None or error is not None:
            self._seen.request_ended(self._running[index], output)
        self._arrived.append(Step(index, token, output, error, logprobs))
        with self._wake_lock:
            if self._wake_pending:
                return  # the loop has yet to look: it will see this one too
            self._wake_pending = True
        self._waker.wake(self._woken)

    async def batches(self) -> AsyncIterator[list[Step]]:
        """The steps that arrived since the last batch, once the loop is woken for them, until
        each choice ended. A choice's last token comes with its output when both arrived in
        the same batch (one step); an end after a failure is dropped."""
        ended: set[int] = set()
        while len(ended) < len(self._handles):
            await self._woken.wait()
            self._woken.clear()
            with self._wake_lock:  # NOTE: cleared before popping, so nothing is missed
                self._wake_pending = False
            batch: list[Step] = []
            last_token: dict[int, int] = {}  # choice -> where its latest token is in batch
            while self._arrived:
                step = self._arrived.popleft()
                if step.index in ended:
                    continue
                if not step.is_last:
                    last_token[step.index] = len(batch)
                    batch.append(step)
                    continue
                ended.add(step.index)
                at = last_token.pop(step.index, None)
                if at is not None and step.error is None:  # its last token: one step
                    held = batch[at]
                    batch[at] = Step(held.index, held.token, step.output, None, held.logprobs)
                else:
                    batch.append(step)
            self.ended = len(ended) == len(self._handles)  # this batch is the last
            if batch:
                yield batch

    async def steps(self) -> AsyncIterator[Step]:
        """Every step of every batch, in order."""
        async for batch in self.batches():
            for step in batch:
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
        self.max_model_len: int | None = None  # the engine's, once it started
        self.error: BaseException | None = None  # the pipeline failed to start
        self.stopping = False
        self._waker: Waker | None = None  # for the serving loop, made on its first request
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._start, name="splitwiser-serve-start")

    def start(self) -> None:
        self._thread.start()

    def _start(self) -> None:
        try:
            pipe = self._factory()
            # the context the engine serves (its default pool may bound the model's)
            self.max_model_len = pipe.stats()["max_model_len"]
            self.pipe = pipe
            # what exists now (the tokenizer, the model's modules, imports) lives as long as the
            # server: out of the collector's sight, a full collection no longer walks it at
            # every few thousand chunks made (as vLLM's server freezes its startup heap)
            gc.collect()
            gc.freeze()
            log.info("pipeline ready: %s", ", ".join(pipe.workers()))
        except BaseException as exc:
            self.error = exc
            log.error("the pipeline failed to start: %s", exc)
        finally:
            self._started.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._started.wait(timeout)

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

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (``pipe.reset_prefix_cache()``): False where blocks
        still in use kept it from resetting. Blocks until the engine did it: call it off the
        loop."""
        return self._ready_pipe().reset_prefix_cache()

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
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = Waker(loop)
        return Generation(loop, handles, observer, self._waker)

    def close(self) -> None:
        """Wait for a start still under way, then close the pipeline (workers first)."""
        self.stopping = True
        self._started.wait()
        if self.pipe is not None:
            try:
                self.pipe.close()
            except SplitwiserError as exc:
                log.error("closing the pipeline: %s", exc)
