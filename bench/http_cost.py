"""What streaming over HTTP costs in CPU, per token, on the server and on the client.

    python bench/http_cost.py [--server floor|serve] [--requests 192] [--prompt-len 256]
                              [--new-tokens 64] [--reps 3] [--out http_cost.json]

The bench's http:// client (``splitwiser.systems.http.OpenAIEndpoint``: aiohttp on
one uvloop loop, as ``vllm bench serve``) sends ``--requests`` streamed completions at once,
``--reps`` times, and reads every token's chunk; each rep reports the CPU seconds (user +
system, from ``/proc``) that the server process and this client took per streamed token.

- ``floor``: a FastAPI app on uvicorn (uvloop, httptools: the stack ``splitwiser serve`` and
  vLLM's server use) that streams ``--new-tokens`` OpenAI-shaped chunks per request, one per
  tick of 15 ms for every open stream, with no model and no engine: what any server on this
  stack costs per chunk, and the client's cost when only it and the server run.
- ``serve``: ``splitwiser serve --device cpu --procs 4`` on the embedded model, the server
  process's threads split into its event loop (the HTTP side) and the rest (the engine
  thread, which an in-process pipeline has too). Its workers are not counted; they share the
  machine's cores with the server and the client, so under ``serve`` every figure also
  includes what contention for the cores adds.

How to read it: the per-token CPU of the loop and of the client is what HTTP adds to each
streamed token; against the CPU that the workers spend per token (the machine's cores times
the run's wall time, over its tokens) it says what share of the workers' machine HTTP takes
when the client runs on the same cores.
"""

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psutil

from splitwiser.sampling import SamplingParams
from splitwiser.systems.http import OpenAIEndpoint

TICK_S = 0.015


def floor_app(new_tokens: int):
    """The stack alone: streams ``new_tokens`` chunks per request, every stream one per tick."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    waiting: list[asyncio.Event] = []

    async def ticker() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            due, waiting[:] = list(waiting), []
            for event in due:
                event.set()

    @app.on_event("startup")
    async def start() -> None:
        asyncio.get_running_loop().create_task(ticker())

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "floor", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or new_tokens)
        head = {"id": "cmpl-" + os.urandom(16).hex(), "object": "text_completion",
                "created": int(time.time()), "model": "floor"}  # fmt: skip

        async def chunks():
            tick = asyncio.Event()
            for i in range(n):
                waiting.append(tick)
                await tick.wait()
                tick.clear()
                last = i == n - 1
                choice = {"index": 0, "text": " x", "logprobs": None,
                          "finish_reason": "length" if last else None, "stop_reason": None,
                          "token_ids": [i]}  # fmt: skip
                chunk = f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
                yield chunk + ("data: [DONE]\n\n" if last else "")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def start_server(kind: str, new_tokens: int) -> tuple[subprocess.Popen, str]:
    if kind == "floor":
        cmd = [sys.executable, __file__, "--run-floor-server", "--new-tokens", str(new_tokens)]
    else:
        cmd = [sys.executable, "-m", "splitwiser", "serve", "--port", "0", "--device", "cpu",
               "--procs", "4", "--no-access-log"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        return proc, _wait_ready(proc, kind)
    except BaseException:
        stop_server(proc)
        raise


def _wait_ready(proc: subprocess.Popen, kind: str) -> str:
    """The server's URL once it answers (its log read up to the line naming it, then drained)."""
    for line in proc.stderr:
        found = re.search(r"(?:listening on|running on) (http://[\d.]+:\d+)", line)
        if found:
            url = found.group(1)
            break
    else:
        raise SystemExit(f"the {kind} server did not start")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # its log keeps flowing
    probe = f"{url}/health" if kind == "serve" else f"{url}/v1/models"
    for _ in range(600):
        try:
            with urllib.request.urlopen(probe):
                return url
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the {kind} server never became ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def thread_times(proc: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def measure(args) -> list[dict]:
    server, url = start_server(args.server, args.new_tokens)
    ps, me = psutil.Process(server.pid), psutil.Process()
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 1000) for _ in range(args.prompt_len)]
               for _ in range(args.requests)]  # fmt: skip
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    reps = []
    try:
        with OpenAIEndpoint(f"{url}/v1") as client:
            for _ in range(args.reps):
                before, mine, t0 = thread_times(ps), sum(me.cpu_times()[:2]), time.monotonic()
                outs = [h.result() for h in [client.submit(p, params) for p in prompts]]
                wall = time.monotonic() - t0
                after, mine = thread_times(ps), sum(me.cpu_times()[:2]) - mine
                tokens = sum(len(o.token_ids) for o in outs)
                spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
                total = sum(spent.values())
                loop = spent.get(server.pid, 0.0)  # the main thread runs the event loop
                reps.append({
                    "wall_s": round(wall, 3), "tokens": tokens,
                    "server_us_per_token": round(1e6 * total / tokens, 1),
                    "server_loop_us_per_token": round(1e6 * loop / tokens, 1),
                    "server_other_us_per_token": round(1e6 * (total - loop) / tokens, 1),
                    "client_us_per_token": round(1e6 * mine / tokens, 1),
                    "machine_cpu_s": round(wall * psutil.cpu_count(), 3),
                })  # fmt: skip
                print(json.dumps(reps[-1]), flush=True)
    finally:
        stop_server(server)
    return reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["floor", "serve"], default="floor")
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out")
    parser.add_argument("--run-floor-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_floor_server:
        import socket

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        print(f"running on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
        config = uvicorn.Config(floor_app(args.new_tokens), log_level="warning",
                                access_log=False, loop="uvloop", http="httptools")  # fmt: skip
        uvicorn.Server(config).run(sockets=[sock])
        return
    reps = measure(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "config": vars(args), "reps": reps}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
