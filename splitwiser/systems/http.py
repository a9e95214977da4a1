"""Any OpenAI-compatible endpoint as a bench system: ``--baseline http://HOST:PORT/v1`` (a server
of its own: nothing is built in the system's process but the client).

Each request goes to ``POST {url}/completions`` as token ids, streamed, with the run's forced
output length (``max_tokens``, ``ignore_eos``), greedy, at its scheduled arrival (the same
replay as Splitwiser's). It is timed from the streamed chunks as ``vllm bench serve`` times it:
every chunk with a non-empty ``choices`` is a token event at the moment it arrived (so a server
that sends one chunk per token, as vLLM and ``splitwiser serve`` do, gives every token's time);
the request ends at ``[DONE]``. Token ids come back where the server returns them
(``return_token_ids``: vLLM and ``splitwiser serve``), for the runs' token agreement. The client
is aiohttp on one event loop (uvloop's where installed); it reads whatever each read brings and
cuts it into events at the blank line (as ``vllm bench serve``), an event cut across reads put
back together.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

from splitwiser.errors import SplitwiserError
from splitwiser.outputs import RequestMetrics, RequestOutput
from splitwiser.systems.base import CACHE_COUNTERS, BenchSystem


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's where it is installed (it comes with ``uvicorn[standard]``), as the server's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _event_data(event: bytes) -> bytes | None:
    """The data of one server-sent event (its ``data:`` lines joined), None without any."""
    if event.startswith(b"data: ") and b"\n" not in event:  # one line: as servers send it
        return event[6:]
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class _Handle:
    """What ``replay_submit`` follows: ``subscribe``, ``result()`` and ``cancel()`` (the
    client closes the stream: the server cancels the request, as ``splitwiser serve`` and
    vLLM do when their client goes away)."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._tokens: list[int | None] = []  # None: a chunk without token ids
        self._listener = None
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._future = None  # the stream's task (concurrent.futures.Future)

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        return self._output

    def subscribe(self, listener) -> None:
        """``listener(token, None, output, error)`` as ``RequestHandle.subscribe``: every token,
        then the end; what happened before is told at once."""
        with self._lock:
            self._listener = listener
            for token in self._tokens:
                listener(token, None, None, None)
            if self._finished.is_set():
                listener(None, None, self._output, self._error)

    def cancel(self) -> None:
        if self._future is not None:
            self._future.cancel()  # the task ends at its next await: the connection closes

    # ---- the event loop's side
    def _push(self, token: int | None) -> None:
        with self._lock:
            self._tokens.append(token)
            if self._listener is not None:
                self._listener(token, None, None, None)

    def _end(self, output: RequestOutput | None, error: BaseException | None) -> None:
        with self._lock:
            self._output, self._error = output, error
            self._finished.set()
            if self._listener is not None:
                self._listener(None, None, output, error)


class OpenAIEndpoint:
    """The ``submit`` contract of a pipeline over an OpenAI-compatible server's completions.

    Every request's stream is read on one event loop in a thread of its own, with aiohttp (as
    ``vllm bench serve``), so the client takes as little of the machine as it can: on a small
    one it shares the cores with the server it measures."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 3600.0):
        try:
            import aiohttp
        except ImportError:
            raise SplitwiserError(
                "an http:// system needs aiohttp: pip install 'splitwiser[serve]'"
            ) from None
        self._aiohttp = aiohttp
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key or 'EMPTY'}"}
        self._timeout_s = timeout_s
        self._loop = _new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="splitwiser-http-client", daemon=True
        )
        self._thread.start()
        self._session = None
        try:
            self.model = self._call(self._first_model())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as exc:
            self.close()
            raise SplitwiserError(f"cannot reach {self.base_url}/models: {exc!r}") from None
        self._next_id = 0

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _first_model(self) -> str:
        aiohttp = self._aiohttp
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            connector=aiohttp.TCPConnector(limit=0),  # as many connections as requests
        )
        async with self._session.get(f"{self.base_url}/models") as r:
            r.raise_for_status()
            return (await r.json())["data"][0]["id"]

    def submit(self, prompt_ids: list[int], params) -> _Handle:
        handle = _Handle(self._next_id)
        self._next_id += 1
        body = {
            "model": self.model, "prompt": list(prompt_ids), "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "ignore_eos": params.ignore_eos, "stream": True,
            "return_token_ids": True,
        }  # fmt: skip
        metrics = RequestMetrics(arrival_time=time.monotonic())
        handle._future = asyncio.run_coroutine_threadsafe(
            self._run(handle, metrics, list(prompt_ids), body), self._loop
        )
        return handle

    async def _run(self, handle: _Handle, metrics, prompt_ids: list[int], body: dict) -> None:
        token_ids, text = [], []
        output, error, reason = None, None, "length"
        try:
            async with self._session.post(f"{self.base_url}/completions", json=body) as r:
                if r.status != 200:
                    raise SplitwiserError(f"HTTP {r.status}: {(await r.text())[:300]}")
                pending = b""  # the start of an event whose end has yet to arrive
                async for received in r.content.iter_any():  # whatever each read brought
                    now = time.monotonic()
                    *events, pending = (pending + received).split(b"\n\n")
                    for event in events:
                        data = _event_data(event)
                        if data is None:
                            continue
                        if data == b"[DONE]":
                            metrics.finish_time = now
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            raise SplitwiserError(chunk["error"].get("message", str(chunk)))
                        if chunk.get("choices"):
                            choice = chunk["choices"][0]
                            metrics.token_times.append(now)
                            text.append(choice.get("text") or "")
                            new = choice.get("token_ids") or ()
                            token_ids.extend(new)
                            for token in new or (None,):
                                handle._push(token)
                    if metrics.finish_time is not None:
                        break
            if metrics.finish_time is None:
                raise SplitwiserError("the stream ended without [DONE]")
        except asyncio.CancelledError:  # the client closed the stream (cancel())
            metrics.finish_time, reason = time.monotonic(), "abort"
        except Exception as exc:  # an HTTP or protocol failure: this request failed
            error = exc if isinstance(exc, SplitwiserError) else SplitwiserError(repr(exc))
        if error is None:
            output = RequestOutput(
                handle.request_id, None, prompt_ids, token_ids, "".join(text), reason, metrics
            )
        handle._end(output, error)

    def metrics_text(self) -> str | None:
        """The server's Prometheus metrics (``GET /metrics``); None where it has none."""
        return self._call(self._get_text("/metrics"))

    def reset_prefix_cache(self) -> bool:
        """``POST /reset_prefix_cache`` (``splitwiser serve``; vLLM's server in dev mode)."""
        return self._call(self._post_ok("/reset_prefix_cache"))

    async def _get_text(self, path: str) -> str | None:
        try:
            async with self._session.get(f"{self.root_url}{path}") as r:
                return await r.text() if r.status == 200 else None
        except (self._aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def _post_ok(self, path: str) -> bool:
        try:
            async with self._session.post(f"{self.root_url}{path}") as r:
                return r.status == 200
        except (self._aiohttp.ClientError, asyncio.TimeoutError):
            return False

    @property
    def root_url(self) -> str:
        """The server's root: the base URL without its ``/v1``."""
        return self.base_url.removesuffix("/v1")

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._session is not None:
            self._call(self._session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prometheus_counters(text: str | None) -> dict[str, float | None]:
    """``CACHE_COUNTERS`` from a server's Prometheus text, by vLLM's names
    (``vllm:prefix_cache_queries``, ``vllm:prefix_cache_hits``, ``vllm:num_preemptions``; the
    ``_total`` samples), each summed over its labels; None where the server has no such one."""
    totals: dict[str, float | None] = dict.fromkeys(CACHE_COUNTERS)
    for line in (text or "").splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line else line.partition(" ")
        key = name.strip().removeprefix("vllm:").removesuffix("_total")
        if key in totals and name.strip().endswith("_total"):
            value = rest.rpartition("}")[2] if "}" in rest else rest
            totals[key] = (totals[key] or 0) + float(value.split()[0])
    return totals


class HTTPSystem(BenchSystem):
    """The endpoint ``spec`` names, with ``$OPENAI_API_KEY`` if set. Its KV counters come from
    the server's ``/metrics`` (vLLM's names, which ``splitwiser serve`` shares)."""

    @classmethod
    def build(cls, spec, config, device, dtype, mps_pipe_dir) -> HTTPSystem:
        return cls(spec, OpenAIEndpoint(spec, api_key=os.environ.get("OPENAI_API_KEY")))

    def cache_counters(self) -> dict:
        return prometheus_counters(self.pipe.metrics_text())

    def reset_prefix_cache(self) -> bool | None:
        return self.pipe.reset_prefix_cache()

    def facts(self, config, records, before) -> dict:
        return {"endpoint": self.pipe.base_url, "served_model": self.pipe.model}
