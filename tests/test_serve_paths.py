"""``splitwiser serve``'s other options and paths, against real server processes where they can
be reached from outside, in-process where they cannot.

One ``--colocated`` server with ``--served-model-name``, ``--chat-template FILE`` and the key
from ``$SPLITWISER_API_KEY`` answers most tests; its last test fails its pipeline for good. A
second server is stopped with two Ctrl-C. The error mapping of exceptions no request can raise
on purpose runs on the app in-process, and ``--mps`` on the CLI with the MPS test doubles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from splitwiser import mps
from splitwiser.errors import PipelineClosedError, WorkerCrashedError
from tests.conftest import hf_greedy
from tests.test_serve import Server

SERVED_NAME = "tiny-chat"
ENV_KEY = "sk-from-the-environment"
KEY = {"Authorization": f"Bearer {ENV_KEY}"}
# not the embedded model's template (<|role|> lines): a prompt made by either is told apart
CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
PROMPTS = [[5, 17, 42, 99, 3], [300 + i for i in range(20)]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SPLITWISER_API_KEY", ENV_KEY)  # no --api-key: the server reads this
        srv = Server(
            "--colocated", "--served-model-name", SERVED_NAME, "--chat-template", str(template),
            "--num-kv-blocks", "320", "--shutdown-timeout", "5",
        )  # fmt: skip
    # the workers take seconds to start; the socket answers at once
    srv.first_completion = post(srv, "/v1/completions", {"prompt": [1, 2], "max_tokens": 1})
    srv.wait_healthy()
    yield srv
    assert srv.stop() == 128 + signal.SIGTERM


@pytest.fixture(scope="module")
def model():
    """The embedded model in this process, for ``generate()`` references."""
    from transformers import AutoModelForCausalLM

    from splitwiser.models.default import ensure_default_model

    return AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32).eval()


def post(server, path: str, body: dict, headers=KEY, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=timeout)


def stream_events(server, path: str, body: dict) -> list[str]:
    """The ``data:`` payloads of a streamed answer, ``[DONE]`` included."""
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True},
                      headers=KEY, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def assert_error(r: httpx.Response, status: int, kind: str, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["type"]) == (status, kind) and words in error["message"], error


def worker_procs(server) -> list[psutil.Process]:
    """The server's live worker processes (not multiprocessing's resource tracker or fork
    server): each names itself ``sw-<role>-<index>`` once started."""
    workers = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # gone meanwhile, or a zombie
            if p.name().startswith("sw-") and p.status() != psutil.STATUS_ZOMBIE:
                workers.append(p)
    return workers


def series(server, name: str, **labels: str) -> float | None:
    """The value of one labelled series on /metrics; None while it does not exist."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        found = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if found and all(f'{k}="{v}"' in found.group(1).split(",") for k, v in labels.items()):
            return float(found.group(2))
    return None


# ---------------------------------------------------------------------- in-process: the app


class _HealthyPipe:
    """A pipeline that says it is healthy and refuses every request with ``error``."""

    def __init__(self, error: Exception):
        self.error = error

    def stats(self) -> dict:
        return {"health": "ok", "error": None, "max_model_len": 64}

    def submit(self, prompt, params):
        raise self.error


@pytest.mark.parametrize(
    "error,status,kind",
    [
        (PipelineClosedError("the pipeline is closed"), 503, "ServiceUnavailableError"),
        (WorkerCrashedError("a worker died"), 500, "InternalServerError"),
        (RuntimeError("something unforeseen"), 500, "InternalServerError"),
    ],
    ids=["closed", "crashed", "unexpected"],
)
def test_runtime_errors_get_their_status_in_openais_shape(error, status, kind):
    from fastapi.testclient import TestClient

    from splitwiser.models.loader import load_model_config, load_tokenizer
    from splitwiser.models.shape import ModelShape
    from splitwiser.server.app import ServeConfig, build_app, build_serving
    from splitwiser.server.bridge import PipelineBridge
    from splitwiser.server.chat import ChatTemplate

    tokenizer = load_tokenizer(None)
    config = ServeConfig(model_name="m", model_root="/m")
    bridge = PipelineBridge(lambda: None)
    bridge.pipe = _HealthyPipe(error)  # as if started: no thread, no workers
    serving = build_serving(
        config, bridge, tokenizer=tokenizer, shape=ModelShape.from_hf(load_model_config(None)),
        max_model_len=64, chat_template=ChatTemplate.choose(tokenizer, None, embedded=True),
    )  # fmt: skip
    with TestClient(build_app(config, bridge, serving), raise_server_exceptions=False) as client:
        r = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert_error(r, status, kind, str(error))


# ---------------------------------------------------------------------- --mps


@pytest.fixture
def serve_cli(fake_mps, monkeypatch, capsys):
    """``splitwiser serve ARGS`` in this process with a GPU pretended and the server replaced:
    (exit code, stderr, the EngineConfig it would have served, or None)."""
    from splitwiser.cli import main
    from splitwiser.server import launcher

    monkeypatch.setattr(mps, "gpu_present", lambda: True)
    served = []
    monkeypatch.setattr(launcher, "serve", lambda engine, listen, **kw: served.append(engine))

    def run(*args: str) -> tuple[int, str, object]:
        served.clear()
        with pytest.raises(SystemExit) as exit_:
            main.main(["serve", "--device", "cuda", *args])
        return exit_.value.code, capsys.readouterr().err, served[0] if served else None

    return run


def test_serve_joins_a_running_mps_daemon_and_never_starts_or_stops_one(
    serve_cli, fake_mps, monkeypatch
):
    daemon = mps.start_daemon()
    try:
        monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", daemon.pipe_dir)
        code, _, engine = serve_cli("--mps", "--mps-split", "70,30")
        assert code == 0
        assert (engine.mps_pipe_dir, engine.mps_thread_percentage) == (daemon.pipe_dir, (70, 30))
        code, _, engine = serve_cli()  # auto: the daemon found running
        assert code == 0 and engine.mps_pipe_dir == daemon.pipe_dir
        code, _, engine = serve_cli("--no-mps", "--mps-split", "70,30")
        assert code == 0 and (engine.mps_pipe_dir, engine.mps_thread_percentage) == (None, None)
        assert mps.daemon_responds(daemon.pipe_dir)  # still running
        assert list(fake_mps.glob("splitwiser-mps-*")) == [Path(daemon.root)]  # no other
    finally:
        daemon.stop()


def test_serve_without_a_daemon_runs_without_mps_or_fails_in_one_line_with_it(serve_cli, fake_mps):
    code, _, engine = serve_cli()  # auto
    assert code == 0 and engine.mps_pipe_dir is None
    code, err, engine = serve_cli("--mps")
    assert code == 2 and engine is None and err.count("\n") == 1
    assert "no MPS daemon is running; start one with 'splitwiser mps start'" in err
    code, err, engine = serve_cli("--mps", "--device", "cpu")
    assert code == 2 and engine is None and "MPS needs a CUDA GPU" in err
    assert list(fake_mps.glob("splitwiser-mps-*")) == []  # none was started


def test_serve_max_num_seqs_defaults_as_the_python_api(serve_cli, fake_mps, monkeypatch):
    from splitwiser import EngineConfig, pipeline

    monkeypatch.setattr(pipeline, "Engine", lambda config: None)  # the config, no workers
    assert serve_cli()[2].max_num_seqs == EngineConfig().max_num_seqs
    for args in ((), ("--max-num-batched-tokens", "48")):
        code, _, engine = serve_cli("--colocated", *args)
        api = pipeline.ColocatedPipeline(max_num_batched_tokens=engine.max_num_batched_tokens)
        assert code == 0 and engine.max_num_seqs == api.config.max_num_seqs
    assert serve_cli("--colocated", "--max-num-seqs", "12")[2].max_num_seqs == 12


# ---------------------------------------------------------------------- Ctrl-C twice


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    """A chunked HTTP body's payload, and the bytes after it."""
    payload = b""
    while True:
        size, data = data.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return payload, data.removeprefix(b"\r\n")
        payload, data = payload + data[: int(size, 16)], data[int(size, 16) + 2 :]


@pytest.mark.slow
def test_health_is_503_while_draining_and_a_second_ctrl_c_cancels_at_once():
    """A short stream with ``GET /health`` pipelined behind it on one connection (a new one
    is refused once stopping), and a long stream: the first Ctrl-C lets the short one finish
    and /health answers 503; the second ends the server at once, long before
    --shutdown-timeout, and leaves no process."""
    shm_before = set(os.listdir("/dev/shm"))
    srv = Server("--colocated", "--num-kv-blocks", "160", "--shutdown-timeout", "120")
    srv.wait_healthy()
    procs = psutil.Process(srv.proc.pid).children(recursive=True)
    long, long_started = [], threading.Event()

    def ask_long():
        body = {"prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    long_started.set()
                    long.append(line)
        except httpx.HTTPError:  # cut: how is not promised
            pass

    thread = threading.Thread(target=ask_long, daemon=True)
    thread.start()
    assert long_started.wait(60)
    # long enough to outlast the signal's way to the server, short against the timeout
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 40, "ignore_eos": True,
                       "stream": True}).encode()  # fmt: skip
    host, port = srv.url.removeprefix("http://").split(":")
    short = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(short + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"data: " not in data:  # the short stream has begun
            data += conn.recv(65536)
        srv.proc.send_signal(signal.SIGINT)
        while chunk := conn.recv(65536):  # the server closes it after the 503
            data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    events, health = _dechunk(rest)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    assert events.decode().split("\n\n")[-2:] == ["data: [DONE]", ""]
    assert events.count(b'"text"') == 40  # the short stream finished while draining
    assert health.startswith(b"HTTP/1.1 503") and b"shutting down" in health
    assert srv.proc.poll() is None  # the long one keeps the server draining
    interrupted = time.monotonic()
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(60) == 0
    assert time.monotonic() - interrupted < 10
    thread.join(30)
    assert 0 < len([e for e in long if '"text"' in e]) < 2000
    psutil.wait_procs(procs, timeout=10)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert [n for n in set(os.listdir("/dev/shm")) - shm_before if str(srv.proc.pid) in n] == []


# ---------------------------------------------------------------------- requests


def test_a_request_before_the_workers_are_ready_is_503(server):
    assert_error(server.first_completion, 503, "ServiceUnavailableError", "starting")


UNSUPPORTED = [
    # (path, fields, words in the message)
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -0.5}, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": 1.2}, "repetition_penalty"),
    ("/v1/chat/completions", {"repetition_penalty": 0.9}, "repetition_penalty"),
    ("/v1/completions", {"echo": True, "logprobs": 1}, "echo with logprobs"),
]


@pytest.mark.parametrize("path,fields,words", UNSUPPORTED)
def test_what_the_runtime_cannot_do_is_a_400_not_a_silent_difference(server, path, fields, words):
    if path == "/v1/completions":
        prompt = {"prompt": [1, 2, 3]}
    else:
        prompt = {"messages": [{"role": "user", "content": "Hi"}]}
    assert_error(post(server, path, {**prompt, "max_tokens": 2, **fields}), 400,
                 "BadRequestError", words)  # fmt: skip


def test_neutral_penalties_and_echo_alone_are_served(server):
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
    for fields in (neutral, dict.fromkeys(neutral), {"echo": True}):
        body = {"prompt": [1, 2, 3], "max_tokens": 2, **fields}
        assert post(server, "/v1/completions", body).status_code == 200, fields


def test_the_api_key_comes_from_the_environment(server):
    models = f"{server.url}/v1/models"
    assert httpx.get(models).status_code == 401
    assert httpx.get(models, headers={"Authorization": "Bearer sk-other"}).status_code == 401
    assert httpx.get(models, headers=KEY).status_code == 200


def test_the_served_model_name_is_the_models_id_in_every_answer_and_the_only_one(server):
    (card,) = httpx.get(f"{server.url}/v1/models", headers=KEY).json()["data"]
    assert card["id"] == SERVED_NAME
    assert os.path.isfile(os.path.join(card["root"], "tokenizer.json"))  # still the directory
    body = {"prompt": [1, 2, 3], "max_tokens": 2}
    assert post(server, "/v1/completions", {**body, "model": SERVED_NAME}).json()["model"] == (
        SERVED_NAME
    )
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    *chunks, done = stream_events(server, "/v1/chat/completions", chat)
    assert done == "[DONE]" and {json.loads(c)["model"] for c in chunks} == {SERVED_NAME}
    for path, request in (("/v1/completions", body), ("/v1/chat/completions", chat)):
        wrong = post(server, path, {**request, "model": "default"})
        assert_error(wrong, 404, "NotFoundError", "The model `default` does not exist.")
    assert series(server, "vllm:generation_tokens_total", model_name=SERVED_NAME) >= 2


def test_chat_prompts_come_from_the_chat_template_file(server):
    prompt = {"prompt": "[user] Hi there\n[assistant]", "add_special_tokens": False}
    expected = post(server, "/tokenize", prompt).json()["tokens"]
    messages = [{"role": "user", "content": "Hi there"}]
    r = post(server, "/v1/chat/completions",
             {"messages": messages, "max_tokens": 2, "return_token_ids": True})  # fmt: skip
    assert r.json()["choices"][0]["prompt_token_ids"] == expected
    assert post(server, "/tokenize", {"messages": messages}).json()["tokens"] == expected


def test_colocated_runs_both_phases_in_one_worker_and_answers_as_generate(server, model):
    assert [p.name() for p in worker_procs(server)] == ["sw-colocated-0"]
    assert series(server, "splitwiser:workers_ready", role="colocated") == 1
    body = {"prompt": PROMPTS, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    choices = post(server, "/v1/completions", body).json()["choices"]
    assert [c["token_ids"] for c in choices] == [hf_greedy(model, p, 8) for p in PROMPTS]


def test_include_stop_str_in_output_keeps_the_stop_string_whole_and_streamed(server):
    base = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = post(server, "/v1/completions", base).json()["choices"][0]["text"]
    # three whole characters from the second half, where they first occur in the text
    at = next(
        i
        for i in range(len(text) // 2, len(text) - 3)
        if text.find(text[i : i + 3]) == i and "\ufffd" not in text[i : i + 3]
    )
    stop = text[at : at + 3]
    for include, expected in ((False, text[:at]), (True, text[: at + 3])):
        body = {**base, "stop": [stop], "include_stop_str_in_output": include}
        (choice,) = post(server, "/v1/completions", body).json()["choices"]
        assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
            expected, "stop", stop,
        ), include  # fmt: skip
        *chunks, done = stream_events(server, "/v1/completions", body)
        pieces = [json.loads(c)["choices"][0] for c in chunks]
        assert "".join(p["text"] for p in pieces) == expected and done == "[DONE]", include
        assert pieces[-1]["finish_reason"] == "stop"


def test_streamed_choices_keep_their_index_and_equal_the_whole_answer(server):
    """Two prompts with ``n=2``: choices 0 and 1 are the first prompt's, 2 and 3 the
    second's; greedy, each streamed choice's tokens and text are the whole answer's."""
    body = {"prompt": PROMPTS, "n": 2, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    whole = post(server, "/v1/completions", body).json()["choices"]
    assert [c["index"] for c in whole] == [0, 1, 2, 3]
    assert whole[0]["token_ids"] == whole[1]["token_ids"] != whole[2]["token_ids"]
    assert whole[2]["token_ids"] == whole[3]["token_ids"]
    *chunks, done = stream_events(server, "/v1/completions", body)
    assert done == "[DONE]"
    streamed = {i: {"tokens": [], "text": "", "ends": []} for i in range(4)}
    for chunk in chunks:
        (c,) = json.loads(chunk)["choices"]
        got = streamed[c["index"]]
        got["tokens"] += c["token_ids"]
        got["text"] += c["text"]
        got["ends"].append(c["finish_reason"])
    for choice in whole:
        got = streamed[choice["index"]]
        assert got["tokens"] == choice["token_ids"] and got["text"] == choice["text"]
        assert got["ends"] == [None] * 5 + ["length"]


# ---------------------------------------------------------------------- a pipeline that failed


def test_a_failed_pipeline_fails_requests_in_flight_then_answers_503(server):
    """The worker killed each time it starts, past the restart rate: the pipeline fails. A
    whole answer in flight gets a 500, a stream in flight an error event then ``[DONE]``;
    /health and new requests get a 503. (The module's last test: its server stays failed.)"""
    long = {"prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True}  # both fit the pool
    whole, events, streaming = {}, [], threading.Event()

    def ask_whole():
        whole["r"] = post(server, "/v1/completions", long, timeout=120)

    def ask_streamed():
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**long, "stream": True},
                          headers=KEY, timeout=120) as r:  # fmt: skip
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    streaming.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (ask_whole, ask_streamed)]
    for t in threads:
        t.start()
    assert streaming.wait(60)
    deadline = time.monotonic() + 60
    while series(server, "vllm:num_requests_running") != 2:  # both generating
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while httpx.get(f"{server.url}/health").status_code == 200:
        assert time.monotonic() < deadline, "the pipeline never failed"
        for p in worker_procs(server):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    assert_error(whole["r"], 500, "InternalServerError", "")
    *tokens, error, done = events
    assert tokens and all(json.loads(t[6:])["choices"] for t in tokens)
    assert json.loads(error[6:])["error"]["code"] == 500 and done == "data: [DONE]"
    assert_error(httpx.get(f"{server.url}/health"), 503, "ServiceUnavailableError", "failed")
    new = post(server, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
    assert_error(new, 503, "ServiceUnavailableError", "failed")
    assert series(server, "splitwiser:worker_restarts_total", role="colocated") == 20
