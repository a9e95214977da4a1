"""Any OpenAI-compatible endpoint as a bench system: ``--baseline http://HOST:PORT/v1``.

Each request goes to ``POST {url}/completions`` as token ids, streamed, with the run's forced
output length (``max_tokens``, ``ignore_eos``), greedy, at its scheduled arrival (the same
replay as Splitwiser's). It is timed from the streamed chunks as ``vllm bench serve`` times it:
every chunk with a non-empty ``choices`` is a token event at the moment it arrived (so a server
that sends one chunk per token, as vLLM and ``splitwiser serve`` do, gives every token's time);
the request ends at ``[DONE]``. Token ids come back where the server returns them
(``return_token_ids``: vLLM and ``splitwiser serve``), for the runs' token agreement.
"""

from __future__ import annotations

import json
import threading
import time

from splitwiser.errors import SplitwiserError
from splitwiser.outputs import RequestMetrics, RequestOutput


def is_http_system(name: str) -> bool:
    return name.startswith(("http://", "https://"))


class _Handle:
    """What ``replay_splitwiser`` waits on: ``done()`` and ``result()``."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        self._finished = threading.Event()
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        return self._output


class OpenAIEndpoint:
    """The ``submit`` contract of a pipeline over an OpenAI-compatible server's completions."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 3600.0):
        import httpx

        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key or 'EMPTY'}"}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.Client(headers=headers, timeout=timeout_s, limits=limits)
        try:
            models = self._client.get(f"{self.base_url}/models").raise_for_status().json()
        except (httpx.HTTPError, ValueError) as exc:
            self._client.close()
            raise SplitwiserError(f"cannot reach {self.base_url}/models: {exc}") from None
        self.model = models["data"][0]["id"]
        self._next_id = 0

    def submit(self, prompt_ids: list[int], params) -> _Handle:
        handle = _Handle(self._next_id)
        self._next_id += 1
        body = {
            "model": self.model, "prompt": list(prompt_ids), "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "ignore_eos": params.ignore_eos, "stream": True,
            "return_token_ids": True,
        }  # fmt: skip
        args = (handle, list(prompt_ids), body)
        threading.Thread(target=self._run, args=args, daemon=True).start()
        return handle

    def _run(self, handle: _Handle, prompt_ids: list[int], body: dict) -> None:
        metrics = RequestMetrics(arrival_time=time.monotonic())
        token_ids, text = [], []
        try:
            with self._client.stream("POST", f"{self.base_url}/completions", json=body) as r:
                if r.status_code != 200:
                    raise SplitwiserError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    now, data = time.monotonic(), line.removeprefix("data: ")
                    if data == "[DONE]":
                        metrics.finish_time = now
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise SplitwiserError(chunk["error"].get("message", str(chunk)))
                    if chunk.get("choices"):
                        choice = chunk["choices"][0]
                        metrics.token_times.append(now)
                        text.append(choice.get("text") or "")
                        token_ids.extend(choice.get("token_ids") or ())
            if metrics.finish_time is None:
                raise SplitwiserError("the stream ended without [DONE]")
            handle._output = RequestOutput(
                handle.request_id, None, prompt_ids, token_ids, "".join(text), "length", metrics
            )
        except Exception as exc:  # an HTTP or protocol failure: this request failed
            handle._error = exc if isinstance(exc, SplitwiserError) else SplitwiserError(repr(exc))
        finally:
            handle._finished.set()

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
