"""KV memory as ``splitwiser serve`` and the CLI expose it: ``--enable-prefix-caching``,
``--gpu-memory-utilization``, ``cache_salt``, ``usage.prompt_tokens_details.cached_tokens``,
``POST /reset_prefix_cache`` and vLLM's prefix-cache, preemption and KV-usage series.

The option parsing and the answers' ``usage`` run in this process; one split server with a small
pool (the module's) answers the rest with a few short requests, the last of which are made to
take turns in the pool (preemption).
"""

from __future__ import annotations

import re
import signal
import threading

import httpx
import pytest

from splitwiser.server.protocol import CompletionRequestMsg
from splitwiser.server.serving import Choice, ChoiceText, _Answer
from tests.test_errors import assert_one_line_error, splitwiser_in_process
from tests.test_serve import Server

API_KEY = "sk-kv-serving"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BLOCK_SIZE = 16
# two requests of 100 + 300 tokens need 25 blocks each: one fits, both at once do not
NUM_KV_BLOCKS = 40
LONG_PROMPT = [100 + (7 * i) % 900 for i in range(100)]  # 6 full blocks and 4 tokens
CACHED = 96  # its full blocks: what a second request finds cached


# ---------------------------------------------------------------------- the command line


@pytest.fixture
def served(monkeypatch):
    """``splitwiser serve ARGS`` in this process with the server replaced: the EngineConfig it
    would serve."""
    from splitwiser.server import launcher

    configs = []
    monkeypatch.setattr(launcher, "serve", lambda engine, listen, **kw: configs.append(engine))

    def run(*args: str):
        result = splitwiser_in_process("serve", "--device", "cpu", *args)
        assert result.exit_code == 0, result.stderr
        return configs.pop()

    return run


def test_kv_memory_options_reach_the_engine_config_with_its_defaults(served):
    config = served()
    assert (config.enable_prefix_caching, config.gpu_memory_utilization) == (None, 0.9)
    assert config.prefix_caching  # None: on with the shared handoff
    assert served("--no-enable-prefix-caching").enable_prefix_caching is False
    assert served("--enable-prefix-caching").enable_prefix_caching is True
    assert served("--gpu-memory-utilization", "0.5").gpu_memory_utilization == 0.5
    copy = served("--kv-handoff", "copy")
    assert copy.enable_prefix_caching is None and not copy.prefix_caching


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--gpu-memory-utilization", "1.5"], "1.5 is not in (0, 1]"),
        (["serve", "--gpu-memory-utilization", "0"], "0 is not in (0, 1]"),
        (["serve", "--gpu-memory-utilization", "abc"], "'abc' is not a valid float"),
        (["generate", "--gpu-memory-utilization", "-0.1", "hi"], "-0.1 is not in (0, 1]"),
        (["serve", "--enable-prefix-caching", "--kv-handoff", "copy"], "needs the shared"),
        (["generate", "--enable-prefix-caching", "--kv-handoff", "copy", "hi"], "needs the shared"),
    ],
)
def test_bad_kv_memory_options_fail_in_one_line(args, message):
    result = splitwiser_in_process(*args)
    assert_one_line_error(result.exit_code, result.stderr, message)


# ---------------------------------------------------------------------- usage, in-process


def test_cached_tokens_count_each_prompt_once_and_only_once_every_choice_ended():
    from splitwiser.models.default import build_tokenizer

    req = CompletionRequestMsg(prompt=[[1] * 40, [2] * 20], n=2, cache_salt="tenant-a")
    params = req.sampling_params(4, 0)
    assert params.cache_salt == "tenant-a"
    tokenizer = build_tokenizer()
    choices = [Choice(i, i // 2, params, ChoiceText(tokenizer, (), False)) for i in range(4)]
    answer = _Answer("cmpl", "text_completion", "m", req, [[1] * 40, [2] * 20], choices)
    assert "prompt_tokens_details" not in answer.usage()  # not known before the end
    for choice, cached in zip(choices, (32, 16, 0, 16)):
        choice.num_cached_tokens = cached
    # prompt 0: the fewer of its choices' (16); prompt 1: 0
    assert answer.usage() == {"prompt_tokens": 60, "completion_tokens": 0, "total_tokens": 60,
                              "prompt_tokens_details": {"cached_tokens": 16}}  # fmt: skip


# ---------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server():
    srv = Server("--procs", "2", "--num-kv-blocks", str(NUM_KV_BLOCKS), "--block-size",
                 str(BLOCK_SIZE), "--api-key", API_KEY)  # fmt: skip
    srv.wait_healthy()
    yield srv
    assert srv.stop() == 128 + signal.SIGTERM


def post(server, path: str, body: dict | None = None, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def complete(server, prompt, **fields) -> dict:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
    r = post(server, "/v1/completions", {**body, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def cached_tokens(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


def value(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def wait_all_free(server, timeout: float = 10.0) -> str:
    """/metrics once every block is free again (the workers let go after the answer)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        text = metrics(server)
        if value(text, "splitwiser:kv_blocks_free") == NUM_KV_BLOCKS:
            return text
        assert time.monotonic() < deadline, "blocks still in use"
        time.sleep(0.05)


def test_a_repeated_prompt_is_served_from_the_cache_with_the_same_tokens(server):
    before = metrics(server)
    first = complete(server, LONG_PROMPT)
    second = complete(server, LONG_PROMPT)
    assert cached_tokens(first) == 0 and cached_tokens(second) == CACHED
    assert second["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    after = wait_all_free(server)
    queries = value(after, "vllm:prefix_cache_queries_total")
    assert queries >= value(before, "vllm:prefix_cache_queries_total") + 2 * len(LONG_PROMPT)
    hits = value(after, "vllm:prefix_cache_hits_total")
    assert hits >= value(before, "vllm:prefix_cache_hits_total") + CACHED
    # the prompt's blocks stay cached, yet free: the pool is not in use
    assert value(after, "splitwiser:kv_blocks_cached") >= CACHED // BLOCK_SIZE
    assert value(after, "vllm:kv_cache_usage_perc") == 0.0


def test_another_cache_salt_finds_nothing_cached(server):
    complete(server, LONG_PROMPT)  # cached without a salt
    salted = complete(server, LONG_PROMPT, cache_salt="tenant-b")
    assert cached_tokens(salted) == 0
    assert cached_tokens(complete(server, LONG_PROMPT, cache_salt="tenant-b")) == CACHED
    r = post(server, "/v1/completions", {"prompt": [1, 2], "cache_salt": ""})
    assert r.status_code == 400 and "cache_salt" in r.json()["error"]["message"]


def test_chat_reports_cached_tokens_whole_and_in_the_streams_usage_chunk(server):
    import json

    text = "Tell me about the blocks of a paged KV cache and how a prefix is shared. " * 3
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3,
            "temperature": 0}  # fmt: skip
    whole = post(server, "/v1/chat/completions", body)
    assert whole.status_code == 200, whole.text
    prompt_tokens = whole.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > BLOCK_SIZE
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=stream, headers=AUTH,
                      timeout=60) as r:  # fmt: skip
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == []
    full_blocks = (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE  # one token always computed
    assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": full_blocks}


def test_reset_prefix_cache_needs_the_key_and_forgets_every_prefix(server):
    complete(server, LONG_PROMPT)
    assert value(wait_all_free(server), "splitwiser:kv_blocks_cached") > 0
    assert post(server, "/reset_prefix_cache", headers={}).status_code == 401
    r = post(server, "/reset_prefix_cache")
    assert r.status_code == 200 and r.content == b""
    assert value(metrics(server), "splitwiser:kv_blocks_cached") == 0
    assert cached_tokens(complete(server, LONG_PROMPT)) == 0


def test_metrics_have_vllms_kv_names_and_preemptions_count_up(server):
    text = metrics(server)
    for name, kind in [("vllm:prefix_cache_queries_total", "counter"),
                       ("vllm:prefix_cache_hits_total", "counter"),
                       ("vllm:num_preemptions_total", "counter"),
                       ("vllm:kv_cache_usage_perc", "gauge"),
                       ("splitwiser:kv_blocks_cached", "gauge")]:  # fmt: skip
        assert f"# TYPE {name} {kind}" in text, name
    preempted = value(text, "vllm:num_preemptions_total")
    # two requests of 25 blocks each in a pool of 40: one is preempted (recomputed) at least once
    answers, threads = {}, []
    for i in range(2):
        prompt = [50 + i + (13 * j) % 700 for j in range(100)]
        body = {"prompt": prompt, "max_tokens": 300, "ignore_eos": True, "temperature": 0}

        def run(i=i, body=body):
            answers[i] = post(server, "/v1/completions", body)

        threads.append(threading.Thread(target=run))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [answers[i].status_code for i in range(2)] == [200, 200]
    assert [answers[i].json()["usage"]["completion_tokens"] for i in range(2)] == [300, 300]
    assert value(wait_all_free(server), "vllm:num_preemptions_total") > preempted
