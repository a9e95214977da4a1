"""``splitwiser serve``, driven by real clients on 127.0.0.1: the ``openai`` SDK and httpx
against a real server process with real workers on the embedded model.

Greedy output equals ``generate()`` token for token (completions and chat, streamed and not);
a stream is one chunk per token and ends ``data: [DONE]``; every bad request gets OpenAI's
error body with its status and the server serves the next one; a client that leaves frees its
KV blocks at once; SIGTERM with requests in flight lets the short one finish, cuts the long one
and leaves no process behind. One server is shared by the module; the shutdown tests start
their own.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import torch

from splitwiser.server.chat import EMBEDDED_CHAT_TEMPLATE, ChatTemplate, render_chat
from splitwiser.server.errors import BadRequest
from splitwiser.server.metrics import buckets_1_2_5
from splitwiser.server.serving import ChoiceText
from tests.conftest import hf_greedy
from tests.test_stop import sentencepiece_style_tokenizer

API_KEY = "sk-serve-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NUM_KV_BLOCKS = 512
MAX_BODY_BYTES = 1 << 20
PROMPTS = [[5, 17, 42, 99, 3], [300 + i for i in range(40)]]


class Server:
    """A ``splitwiser serve`` process: its URL once listening, its log, its exit."""

    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "splitwiser", "serve", "--port", "0", "--device", "cpu",
               "--no-access-log", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening on (http://[\d.]+:\d+)", line)
            if found:
                self.url = found.group(1)
                break
        assert self.url, "".join(self.lines)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_healthy(self, timeout: float = 120.0) -> list[int]:
        """Poll /health until 200; every status seen."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen.append(httpx.get(f"{self.url}/health").status_code)
            if seen[-1] == 200:
                return seen
            time.sleep(0.1)
        raise AssertionError(f"never healthy: {seen[-3:]}\n{''.join(self.lines)}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def server():
    srv = Server("--procs", "2", "--num-kv-blocks", str(NUM_KV_BLOCKS), "--api-key", API_KEY,
                 "--max-body-bytes", str(MAX_BODY_BYTES))  # fmt: skip
    srv.first_health = srv.wait_healthy()
    yield srv
    assert srv.stop() == 128 + signal.SIGTERM


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """The embedded model in this process, and its tokenizer, for ``generate()`` references."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splitwiser.models.default import ensure_default_model

    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def post(server, path, body=None, headers=AUTH, timeout=60.0) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=timeout)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    found = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def wait_free_blocks(server, expected: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while (free := metric(server, "splitwiser:kv_blocks_free")) != expected:
        if time.monotonic() > deadline:
            return free
        time.sleep(0.05)
    return free


# ---------------------------------------------------------------------- pure logic


def test_token_buckets_are_vllms_1_2_5_series():
    assert buckets_1_2_5(256) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert buckets_1_2_5(1000)[-1] == 1000


def test_text_held_back_never_has_to_be_taken_back_at_a_stop_string(reference):
    from splitwiser.outputs import RequestMetrics, RequestOutput

    _, tok = reference
    ids, stop = tok("the cat sat on the mat").input_ids, "on the"
    text = ChoiceText(tok, stop=(stop,), include_stop=False)
    sent, fed = "", []
    for t in ids:  # as the engine runs: until the stop string appears
        fed.append(t)
        sent += text.add(t)
        if stop in tok.decode(fed):
            break
    cut = tok.decode(fed)[: tok.decode(fed).find(stop)]
    assert cut.startswith(sent)  # never past the cut
    out = RequestOutput(0, None, [1], fed, cut, "stop", RequestMetrics(0.0))
    assert sent + text.finish(out) == cut == "the cat sat "


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_streamed_text_is_the_whole_decode_at_every_token(reference, style):
    """Decoded a window at a time, the text sent is the output's decode up to its last whole
    character at every token (bytes joined across tokens, broken bytes, special tokens), never
    taken back, and the end completes it."""
    from splitwiser.outputs import RequestMetrics, RequestOutput

    tok = reference[1] if style == "byte-level" else sentencepiece_style_tokenizer()
    if style == "byte-level":  # any token: ByteLevel decodes broken bytes the same in context
        units = [[t] for t in range(len(tok))]
    else:  # words and whole characters split over byte tokens: a run of byte tokens that is
        # not UTF-8 decodes to one \ufffd per byte, so its text changes as it grows
        units = [[t] for t in range(8)] + [
            [tok.convert_tokens_to_ids(f"<0x{b}>") for b in c]
            for c in (("C3", "A9"), ("E4", "B8", "AD"), ("41",))
        ]
    rng = random.Random(0)
    for _ in range(150):
        ids = [t for _ in range(rng.randrange(1, 40)) for t in rng.choice(units)]
        final = tok.decode(ids, skip_special_tokens=True)
        text, sent = ChoiceText(tok, (), False), ""
        for n in range(1, len(ids) + 1):
            sent += text.add(ids[n - 1])
            assert final.startswith(sent)  # never taken back
            so_far = tok.decode(ids[:n], skip_special_tokens=True)
            if not so_far.endswith("\ufffd"):
                assert sent == so_far  # and never late
        out = RequestOutput(0, None, [1], ids, final, "length", RequestMetrics(0.0))
        assert sent + text.finish(out) == final


def test_a_model_without_chat_template_gets_vllms_400(reference):
    _, tok = reference
    with pytest.raises(BadRequest, match="chat template"):
        render_chat(tok, ChatTemplate("none"), [{"role": "user", "content": "x"}],
                    add_generation_prompt=True)  # fmt: skip
    assert ChatTemplate.choose(tok, None, embedded=True).text == EMBEDDED_CHAT_TEMPLATE


def test_an_error_after_the_stream_started_is_sent_in_it_then_done(reference):
    import asyncio

    from splitwiser.errors import WorkerCrashedError
    from splitwiser.server.bridge import Step
    from splitwiser.server.protocol import CompletionRequestMsg
    from splitwiser.server.serving import Choice, _Answer

    class FailingGeneration:  # one token, then the request fails
        ended = False

        async def batches(self):
            yield [Step(0, 7)]
            yield [Step(0, None, error=WorkerCrashedError("worker died"))]

        def cancel(self):
            self.cancelled = True

    req = CompletionRequestMsg(prompt=[1, 2], stream=True)
    choice = Choice(0, 0, req.sampling_params(4, 0), ChoiceText(reference[1], (), False))
    answer = _Answer("cmpl", "text_completion", "m", req, [[1, 2]], [choice])
    gen = FailingGeneration()

    async def run():
        return [c async for c in answer.completion_chunks(gen)]

    chunks = asyncio.run(run())
    assert json.loads(chunks[0][6:])["choices"][0]["index"] == 0
    error, done = chunks[1].split("\n\n", 1)  # sent together, as the stream's end
    assert json.loads(error[6:])["error"]["message"] == "worker died"
    assert done == "data: [DONE]\n\n" and gen.cancelled


def test_generation_follows_handles_filled_by_another_thread_without_a_thread_each():
    """Real handles filled from a thread as the engine's: every token in order, each choice's
    last token carries its output when both were queued, events before ``subscribe`` are told
    too, a failure ends its choice, and no thread is started per request."""
    import asyncio

    from splitwiser.errors import WorkerCrashedError
    from splitwiser.handle import RequestHandle
    from splitwiser.outputs import RequestMetrics, RequestOutput
    from splitwiser.server.bridge import Generation

    def output(i, tokens):
        return RequestOutput(i, None, [1], tokens, "", "length", RequestMetrics(0.0))

    handles = [RequestHandle(i) for i in range(3)]
    done = output(0, [10, 11, 12])
    for token in (10, 11, 12):  # all before the Generation subscribes: told at once, queued
        handles[0]._push(token)
    handles[0]._finish(done)

    def engine():
        for token in range(20, 60):
            handles[1]._push(token)
            time.sleep(0.0005)
        handles[1]._finish(output(1, list(range(20, 60))))
        handles[2]._push(99)
        handles[2]._fail(WorkerCrashedError("gone"))

    async def run():
        threads_before = threading.active_count()
        gen = Generation(asyncio.get_running_loop(), handles)
        assert threading.active_count() == threads_before
        feeder = threading.Thread(target=engine)
        feeder.start()
        steps = [step async for step in gen.steps()]
        feeder.join()
        return steps

    steps = asyncio.run(run())
    by_choice = {i: [s for s in steps if s.index == i] for i in range(3)}
    assert [s.token for s in by_choice[0] if s.token is not None] == [10, 11, 12]
    assert [s.token for s in by_choice[1] if s.token is not None] == list(range(20, 60))
    assert by_choice[0][-1].output is done and by_choice[0][-1].token == 12  # one step
    assert all(not s.is_last for s in by_choice[1][:-1]) and by_choice[1][-1].output.token_ids
    assert [s.token for s in by_choice[2]] == [99, None]
    assert isinstance(by_choice[2][-1].error, WorkerCrashedError)


# ---------------------------------------------------------------------- the server


def test_health_is_503_until_the_workers_are_ready_then_200(server):
    assert server.first_health[0] == 503 and server.first_health[-1] == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_models_lists_the_served_model(client):
    (card,) = client.models.list().data
    assert card.id == "default" and card.model_extra["max_model_len"] == 8192
    assert os.path.isfile(os.path.join(card.model_extra["root"], "tokenizer.json"))


def test_completions_greedy_equal_generate(client, reference):
    model, tok = reference
    out = client.completions.create(
        model="default", prompt=PROMPTS, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    for prompt, choice in zip(PROMPTS, sorted(out.choices, key=lambda c: c.index)):
        expected = hf_greedy(model, prompt, 12)
        assert choice.model_extra["token_ids"] == expected
        assert choice.text == tok.decode(expected, skip_special_tokens=True)
        assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == sum(map(len, PROMPTS))
    assert out.usage.completion_tokens == 24


def test_completion_stream_is_one_chunk_per_token_then_usage_then_done(server, reference):
    model, tok = reference
    body = {
        "prompt": PROMPTS[1],
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    *tokens, last = chunks
    assert len(tokens) == 10 and last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    ids = [c["choices"][0]["token_ids"][0] for c in tokens]
    assert ids == hf_greedy(model, PROMPTS[1], 10)
    assert "".join(c["choices"][0]["text"] for c in tokens) == tok.decode(ids)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 9 + ["length"]


def test_chat_through_the_sdk_streamed_and_not_equals_generate(client, reference):
    model, tok = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(messages, chat_template=EMBEDDED_CHAT_TEMPLATE,
                                     tokenize=False, add_generation_prompt=True)  # fmt: skip
    expected = tok.decode(hf_greedy(model, tok(prompt, add_special_tokens=False).input_ids, 8))
    whole = client.chat.completions.create(
        model="default", messages=messages, max_completion_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    parts = [{"type": "text", "text": "Hi"}]  # content as a list of text parts
    stream = client.chat.completions.create(
        model="default", messages=[messages[0], {"role": "user", "content": parts}],
        max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert len(chunks) == 8 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_n_echo_min_tokens_and_seeds(server, reference):
    model, tok = reference
    ids = hf_greedy(model, PROMPTS[0], 16)
    text = tok.decode(ids)
    stop = text[len(tok.decode(ids[:6])) :][:3]  # a stop string inside the 7th token onwards
    r = post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 16,
             "temperature": 0, "stop": [stop], "ignore_eos": True}).json()  # fmt: skip
    assert r["choices"][0]["text"] == text[: text.find(stop)]
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == stop
    r = post(server, "/v1/completions", {"prompt": "Once upon", "max_tokens": 3, "n": 2,
             "echo": True, "temperature": 0.8, "seed": 1}).json()  # fmt: skip
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert all(c["text"].startswith("Once upon") for c in r["choices"])
    again = post(server, "/v1/completions", {"prompt": "Once upon", "max_tokens": 3, "n": 2,
                 "echo": True, "temperature": 0.8, "seed": 1}).json()  # fmt: skip
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in r["choices"]]
    # the first greedy token as a stop token: min_tokens masks it (and EOS) for two tokens, as
    # vLLM and generate(min_new_tokens=2) do; then it ends the request if drawn
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0,
            "stop_token_ids": [ids[0]], "min_tokens": 2, "return_token_ids": True}  # fmt: skip
    r = post(server, "/v1/completions", body).json()
    eos = model.generation_config.eos_token_id
    stops = [ids[0], *([eos] if isinstance(eos, int) else eos or [])]
    expected = hf_greedy(model, PROMPTS[0], 6, eos=stops, min_new_tokens=2)
    assert r["choices"][0]["token_ids"] == expected and expected[0] != ids[0]


def test_logprobs_in_completions_and_chat_are_generates_scores(server, reference):
    """vLLM's shapes: completions' tokens / token_logprobs / top_logprobs (the drawn token among
    them) / text_offset, whole and one token per chunk; chat's content entries with bytes and
    top_logprobs; the values are log_softmax of generate()'s logits."""
    model, tok = reference
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             eos_token_id=[])  # fmt: skip
    greedy = ref.sequences[0, len(PROMPTS[0]) :].tolist()
    ref_lps = [torch.log_softmax(step[0].float(), dim=-1) for step in ref.logits]
    strs = [tok.decode([t]) for t in greedy]
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": 2}  # fmt: skip
    lp = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert lp["tokens"] == strs
    assert lp["token_logprobs"] == pytest.approx([r[t].item() for r, t in zip(ref_lps, greedy)],
                                                 abs=1e-4)  # fmt: skip
    assert lp["text_offset"] == [sum(len(s) for s in strs[:i]) for i in range(4)]
    for top, want in zip(lp["top_logprobs"], ref_lps):
        values, indices = want.topk(2)
        assert list(top) == [tok.decode([i]) for i in indices.tolist()]  # greedy: drawn is top
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={**body, "stream": True}) as r:  # fmt: skip
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]  # fmt: skip
    # (a last chunk with the finish reason alone, if it came apart from the last token, has none)
    per_chunk = [c["choices"][0]["logprobs"] for c in chunks if c["choices"]]
    per_chunk = [p for p in per_chunk if p is not None]
    assert [p["tokens"] for p in per_chunk] == [[s] for s in strs]
    assert [p["text_offset"][0] for p in per_chunk] == lp["text_offset"]
    chat = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
        "ignore_eos": True, "logprobs": True, "top_logprobs": 2,
    }).json()["choices"][0]["logprobs"]["content"]  # fmt: skip
    assert len(chat) == 3
    for entry in chat:
        assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] <= 0
        assert [t["logprob"] for t in entry["top_logprobs"]][0] == pytest.approx(
            entry["logprob"], abs=1e-5
        )
    bad = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2,
    })  # fmt: skip
    assert bad.status_code == 400 and "`logprobs` must be set" in bad.json()["error"]["message"]
    no = post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2}).json()
    assert no["choices"][0]["logprobs"] is None


BAD_REQUESTS = [
    # (body or raw bytes, headers, status, words in the message)
    ({"prompt": "x", "max_tokens": 0}, AUTH, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, AUTH, 400, "max_tokens"),
    ({"prompt": ""}, AUTH, 400, "empty"),
    ({"prompt": [1, 2], "stream_options": {"include_usage": True}}, AUTH, 400, "stream"),
    ({"prompt": [1, 2], "logprobs": 21}, AUTH, 400, "greater than max allowed: 20"),
    ({"prompt": [1, 2], "logprobs": -1}, AUTH, 400, "non-negative"),
    ({"prompt": [7] * 8192, "max_tokens": 1}, AUTH, 400, "maximum context length is 8192"),
    ({"prompt": [7] * 8000, "max_tokens": 500}, AUTH, 400, "maximum context length is 8192"),
    ({"prompt": [1, 99999]}, AUTH, 400, "vocabulary"),
    ({"prompt": "x", "model": "gpt-4"}, AUTH, 404, "does not exist"),
    ({"prompt": "x"}, {}, 401, "Unauthorized"),
    ({"prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, "Unauthorized"),
    (b"{not json", {**AUTH, "Content-Type": "application/json"}, 400, "JSON"),
    (b'{"prompt": "x"}', {**AUTH, "Content-Type": "text/plain"}, 400, "application/json"),
    (b"[" + b"1," * MAX_BODY_BYTES + b"1]", {**AUTH, "Content-Type": "application/json"}, 413,
     "body"),
]  # fmt: skip


@pytest.mark.parametrize("body,headers,status,words", BAD_REQUESTS)
def test_each_bad_request_gets_its_status_and_openai_error_then_the_next_is_served(
    server, body, headers, status, words
):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert words in error["message"]
    ok = post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_unknown_fields_are_ignored_and_only_v1_needs_the_key(server):
    r = post(server, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "best_of": 1,
             "user": "u", "continuous_usage_stats": True, "seed": None})  # fmt: skip
    assert r.status_code == 200
    tokens = post(server, "/tokenize", {"prompt": "hello world"}, headers={}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 8192
    text = post(server, "/detokenize", {"tokens": tokens["tokens"]}, headers={}).json()
    assert text["prompt"] == "hello world"
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, headers={})
    assert chat.json()["count"] > 2
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_metrics_have_vllms_names_types_buckets_and_model_name(server):
    post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 3})
    text = httpx.get(f"{server.url}/metrics").text
    for name, kind in [("vllm:num_requests_running", "gauge"),
                       ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"),
                       ("vllm:prompt_tokens", "counter"), ("vllm:generation_tokens", "counter"),
                       ("vllm:request_success", "counter"),
                       ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:inter_token_latency_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram"),
                       ("splitwiser:handoff_seconds", "histogram"),
                       ("splitwiser:workers_ready", "gauge"),
                       ("splitwiser:worker_restarts", "counter")]:  # fmt: skip
        exposed = f"{name}_total" if kind == "counter" else name  # as prometheus_client does
        assert f"# TYPE {exposed} {kind}" in text, name
    assert (
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="2560.0",model_name="default"}'
        in text
    )
    assert re.search(r'vllm:request_success_total\{.*finished_reason="length".*\} [1-9]', text)
    assert metric(server, "vllm:generation_tokens_total") >= 3
    assert re.search(r'splitwiser:workers_ready\{.*role="token"\} 1.0', text)


def test_a_client_leaving_a_stream_frees_its_blocks_at_once(server):
    def num_aborted() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        line = r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$'
        found = re.search(line, text, re.M)
        return float(found.group(1)) if found else 0.0  # no line before the first abort

    assert wait_free_blocks(server, NUM_KV_BLOCKS, 30) == NUM_KV_BLOCKS
    aborted = num_aborted()
    body = {"prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(server, "splitwiser:kv_blocks_free") < NUM_KV_BLOCKS  # blocks held
    # 4000 tokens take ~20 s; the blocks come back at once
    assert wait_free_blocks(server, NUM_KV_BLOCKS, 5) == NUM_KV_BLOCKS
    deadline = time.monotonic() + 5
    while num_aborted() == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert num_aborted() == aborted + 1  # counted once, as aborted


def test_a_client_leaving_a_whole_answer_frees_its_blocks_at_once(server):
    assert wait_free_blocks(server, NUM_KV_BLOCKS, 30) == NUM_KV_BLOCKS
    body = {"prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=1.0)
    assert wait_free_blocks(server, NUM_KV_BLOCKS, 5) == NUM_KV_BLOCKS
    ok = post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
    assert ok.status_code == 200


# ---------------------------------------------------------------------- shutdown


def _stream_in_thread(url: str, max_tokens: int, out: dict) -> threading.Thread:
    """A stream read in a thread: ``out["started"]`` is set at its first event, and
    ``out["events"]`` holds them all once it ended (``out["error"]`` if it broke)."""
    out["started"] = threading.Event()

    def run():
        body = {"prompt": [5, 6, 7], "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True}  # fmt: skip
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                events = []
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        out["started"].set()
                out["events"] = events
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_sigterm_finishes_short_requests_cuts_long_ones_and_leaves_nothing(leftovers):
    """The short stream ends whole; the long one is cut at --shutdown-timeout with an error
    event then ``[DONE]``; the server exits 143 soon after, leaving no process or segment."""
    shutdown_timeout_s = 3.0
    shm_before = set(os.listdir("/dev/shm"))
    srv = Server("--procs", "2", "--num-kv-blocks", "512", "--shutdown-timeout",
                 str(shutdown_timeout_s))  # fmt: skip
    srv.wait_healthy()
    workers = psutil.Process(srv.proc.pid).children(recursive=True)
    short, long = {}, {}
    threads = [_stream_in_thread(srv.url, 24, short), _stream_in_thread(srv.url, 4000, long)]
    assert short["started"].wait(60) and long["started"].wait(60)  # both are generating
    started = time.monotonic()
    assert srv.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    # it waits for the long one that long, then closes the workers (2-4 s on 2 busy cores)
    assert shutdown_timeout_s <= time.monotonic() - started < shutdown_timeout_s + 7
    for t in threads:
        t.join(30)
    assert short["events"][-1] == "data: [DONE]" and len(short["events"]) == 25
    assert "error" not in long, long
    *tokens, error, done = long["events"]
    assert 0 < len(tokens) < 4000 and all(json.loads(t[6:])["choices"] for t in tokens)
    assert json.loads(error[6:])["error"]["code"] == 503 and done == "data: [DONE]"
    psutil.wait_procs(workers, timeout=10)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers.new_children() == set()
    mine = [n for n in set(os.listdir("/dev/shm")) - shm_before if str(srv.proc.pid) in n]
    assert mine == []
    assert "SIGTERM" in "".join(srv.lines)


@pytest.mark.slow
def test_ctrl_c_while_idle_exits_0():
    srv = Server("--procs", "2", "--num-kv-blocks", "64")
    srv.wait_healthy()
    assert srv.stop(signal.SIGINT) == 0
    assert "pipeline closed" in "".join(srv.lines)


# ---------------------------------------------------------------------- bench system


def test_an_openai_endpoint_as_a_bench_system_times_every_token(server, reference):
    from splitwiser import SamplingParams
    from splitwiser.benchmark.config import BenchConfig
    from splitwiser.benchmark.workloads import BenchRequest
    from splitwiser.systems import get_system
    from splitwiser.systems.http import OpenAIEndpoint

    url = f"{server.url}/v1"
    assert BenchConfig(baselines=(url,)).baselines == (url,)
    model, _ = reference
    with OpenAIEndpoint(url, api_key=API_KEY) as endpoint:
        assert endpoint.model == "default"
        handle = endpoint.submit(PROMPTS[1], SamplingParams(max_new_tokens=8, ignore_eos=True))
        out = handle.result(60)
        assert out.token_ids == hf_greedy(model, PROMPTS[1], 8)
        assert len(out.metrics.token_times) == 8 and out.metrics.finish_time is not None
        requests = [BenchRequest(i, 0.01 * i, len(p), 4) for i, p in enumerate(PROMPTS)]
        system = get_system(url)(url, endpoint)
        records, duration_s = system.replay(requests, PROMPTS, lambda n: None)
    assert [r.ok for r in records] == [True, True] and duration_s > 0
    assert [r.token_ids for r in records] == [hf_greedy(model, p, 4) for p in PROMPTS]
    with pytest.raises(Exception, match="cannot reach"):
        OpenAIEndpoint("http://127.0.0.1:9/v1")


# ---------------------------------------------------------------------- vLLM's own client


def vllm_command() -> list[str] | None:
    """The ``vllm`` command of this install, if vLLM is installed (an optional extra)."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        return None
    return [shutil.which("vllm")]


@pytest.mark.slow
@pytest.mark.skipif(vllm_command() is None, reason="vLLM is not installed (the vllm extra)")
@pytest.mark.parametrize(
    "backend, endpoint",
    [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")],
    ids=["completions", "chat"],
)
def test_vllm_bench_serve_completes_every_request(server, tmp_path, backend, endpoint):
    """``vllm bench serve`` as the README runs it, from this install's ``vllm`` command."""
    from splitwiser.models.default import ensure_default_model

    num_prompts = 24
    env = os.environ | {"OPENAI_API_KEY": API_KEY}  # sent as the bearer token
    proc = subprocess.run(
        [*vllm_command(), "bench", "serve", "--backend", backend, "--endpoint", endpoint,
         "--base-url", server.url, "--model", "default", "--tokenizer",
         str(ensure_default_model()), "--dataset-name", "random",
         "--num-prompts", str(num_prompts), "--random-input-len", "128",
         "--random-output-len", "32", "--save-result", "--result-dir", str(tmp_path),
         "--result-filename", "result.json"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] == num_prompts, result
    assert result.get("failed", 0) == 0 and result["total_output_tokens"] > 0, result
