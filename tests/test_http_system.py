"""The bench's http:// client against a server that splits its events across writes."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from splitwiser.sampling import SamplingParams
from splitwiser.systems.http import OpenAIEndpoint, _event_data


def test_event_data_joins_data_lines_and_skips_comments():
    assert _event_data(b'data: {"a":1}') == b'{"a":1}'
    assert _event_data(b"data: [DONE]") == b"[DONE]"
    assert _event_data(b"data:x\ndata: y") == b"x\ny"
    assert _event_data(b": keep-alive") is None


def _stream_body(tokens: list[int]) -> bytes:
    events = [
        ": a comment line, ignored\n\n",
        *(
            "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{t}", "token_ids": [t]}]})
            + "\n\n"
            for t in tokens
        ),
        'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n',
        "data: [DONE]\n\n",
    ]  # fmt: skip
    return "".join(events).encode()


class _SplittingServer:
    """/v1/models, and a streamed /v1/completions whose bytes go out in 7-byte writes (events
    cut anywhere, "\\n\\n" included), over real sockets on 127.0.0.1."""

    def __init__(self, tokens: list[int]):
        self.body = _stream_body(tokens)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()

        self.thread = threading.Thread(
            target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever())
        )
        self.thread.start()
        started.wait(10)

    async def _handle(self, reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length")), 0)  # fmt: skip
            await reader.readexactly(length)
            if head.startswith(b"GET /v1/models"):
                body = b'{"data":[{"id":"m"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
            for i in range(0, len(self.body), 7):
                piece = self.body[i : i + 7]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_events_cut_across_reads_are_put_back_together():
    tokens = [11, 12, 13]
    server = _SplittingServer(tokens)
    try:
        with OpenAIEndpoint(f"http://127.0.0.1:{server.port}/v1") as endpoint:
            params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
            out = endpoint.submit([1, 2, 3], params).result(timeout=30)
    finally:
        server.close()
    assert out.token_ids == tokens and out.text == " t11 t12 t13"
    assert len(out.metrics.token_times) == 3  # the usage chunk is not a token
    assert out.metrics.finish_time >= out.metrics.token_times[-1]


def test_http_cost_measures_the_floor_server(tmp_path):
    """bench/http_cost.py against its stack-only server: every token read, CPU per token
    reported for server and client, the server stopped."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "floor.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "http_cost.py"
    cmd = [sys.executable, str(script), "--server", "floor", "--requests", "4",
           "--new-tokens", "3", "--prompt-len", "5", "--reps", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (rep,) = json.loads(out.read_text())["reps"]
    assert rep["tokens"] == 12
    # CPU is read in clock ticks (10 ms): a dozen tokens may read as none, but never more than
    # the machine had in the rep's wall time, and the server's parts add up to its total
    most = 1e6 * rep["machine_cpu_s"] / rep["tokens"]
    for key in ("server_us_per_token", "server_loop_us_per_token", "client_us_per_token"):
        assert 0 <= rep[key] <= most, key
    parts = rep["server_loop_us_per_token"] + rep["server_other_us_per_token"]
    assert rep["server_us_per_token"] == pytest.approx(parts, abs=0.11)
    leftover = subprocess.run(["pgrep", "-f", "run-floor-server"], capture_output=True)
    assert leftover.returncode == 1, leftover.stdout  # the server was stopped
