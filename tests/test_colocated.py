"""The colocated pipeline beyond exactness (tests/test_exactness.py): one real worker process,
killed and resumed, cancelled in each phase, and options it refuses."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from splitwiser import ColocatedPipeline, ConfigError, SamplingParams
from splitwiser.roles import workers_per_role
from tests.conftest import hf_greedy

WORKER = "splitwiser-colocated-0"


def _wait_for(predicate, timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_killed_worker_requests_resume_with_the_same_tokens(
    model_dirs, reference_models, leftovers
):
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (5, 40, 17, 90)]
    greedy = SamplingParams(max_new_tokens=150, ignore_eos=True)
    seeded = SamplingParams(max_new_tokens=150, temperature=1.0, top_k=50, seed=5, ignore_eos=True)
    refs = [hf_greedy(reference_models["llama"], p, 150) for p in prompts]
    with ColocatedPipeline(model_dirs["llama"], device="cpu", max_num_batched_tokens=64) as pipe:
        assert pipe.config.max_num_seqs == 64  # 128 by default, at most the step budget
        seeded_ref = pipe.generate([prompts[1]], seeded)[0].token_ids
        handles = [pipe.submit(p, greedy) for p in prompts] + [pipe.submit(prompts[1], seeded)]
        streams = [[] for _ in handles]
        readers = [
            threading.Thread(target=lambda h=h, s=s: s.extend(h.stream(timeout=120)))
            for h, s in zip(handles, streams)
        ]
        for t in readers:
            t.start()
        _wait_for(lambda: all(len(s) >= 3 for s in streams), what="decoding to start")
        os.kill(pipe.workers()[WORKER]["pid"], signal.SIGKILL)
        outs = [h.result(timeout=120) for h in handles]
        for t in readers:
            t.join(timeout=120)
        stats = pipe.stats()
    assert [o.token_ids for o in outs[:4]] == refs  # greedy: generate()'s tokens
    assert outs[4].token_ids == seeded_ref  # seeded: the same draws after the resume
    assert streams == [o.token_ids for o in outs]  # streamed once each, none repeated
    assert stats["restarts"]["colocated"] == 1 and stats["num_retried"] >= 1
    assert stats["num_free_blocks"] == stats["num_kv_blocks"]
    leftovers.assert_clean()


def test_cancel_while_chunked_and_while_decoding_frees_the_blocks(
    model_dirs, reference_models, leftovers
):
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    with ColocatedPipeline(
        model_dirs["qwen2"], device="cpu", max_num_batched_tokens=8, max_num_seqs=8
    ) as pipe:
        decoding = pipe.submit([4, 5, 6], long)
        next(iter(decoding.stream(timeout=60)))
        since = time.monotonic()
        # 199 prompt tokens at 7 a step beside the decode: about 28 mixed steps of prefill
        chunked = pipe.submit(list(range(1, 200)), long)
        _wait_for(lambda: any(s.kind == "mixed" for s in pipe.phase_log(since)), 60, "a chunk")
        chunked.cancel()  # its prompt is part-way through its chunks
        out = chunked.result(timeout=60)
        assert out.finish_reason == "abort" and out.token_ids == []  # no first token yet
        decoding.cancel()
        out = decoding.result(timeout=60)
        assert out.finish_reason == "abort" and 1 <= len(out.token_ids) < 200
        chunks = [s.num_tokens for s in pipe.phase_log(since) if s.kind == "mixed"]
        assert 0 < sum(chunks) < 199  # the prefill was cut short
        assert pipe.stats()["num_free_blocks"] == pipe.num_kv_blocks
        out = pipe.generate([[7, 8, 9]], SamplingParams(max_new_tokens=3))[0]
        assert out.token_ids == hf_greedy(reference_models["qwen2"], [7, 8, 9], 3)
    leftovers.assert_clean()


def test_each_step_fills_the_token_budget_exactly(model_dirs, reference_models, leftovers):
    """The decodes take one token of the budget each, prefill chunks the rest, to the last."""
    prompt = [(11 * i) % 900 + 1 for i in range(48)]
    other = [(13 * i) % 900 + 2 for i in range(45)]  # no prefix of it is cached
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    model = reference_models["llama"]
    with ColocatedPipeline(
        model_dirs["llama"], device="cpu", max_num_batched_tokens=16, max_num_seqs=16
    ) as pipe:
        since = time.monotonic()
        alone = pipe.generate([prompt], params)[0]
        chunks = [s.num_tokens for s in pipe.phase_log(since) if s.kind == "mixed"]
        assert chunks == [16, 16, 16]  # the budget, exactly, three times
        decoding = pipe.submit([4, 5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True))
        next(iter(decoding.stream(timeout=60)))
        since = time.monotonic()
        beside = pipe.generate([other], params)[0]
        chunks = [s.num_tokens for s in pipe.phase_log(since) if s.kind == "mixed"]
        assert chunks == [15, 15, 15]  # one token of each step went to the running decode
        decoding.cancel()
        decoding.result(timeout=60)
    assert alone.token_ids == hf_greedy(model, prompt, 4)
    assert beside.token_ids == hf_greedy(model, other, 4)
    leftovers.assert_clean()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_prompt_workers": 2}, "num_prompt_workers is not an option of the colocated"),
        ({"kv_handoff": "copy"}, "kv_handoff is not an option"),
        ({"max_num_batched_tokens": 8, "max_num_seqs": 16}, r"must be >= max_num_seqs \(16\)"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be a positive integer"),
    ],
)
def test_options_it_refuses(options, message, leftovers):
    with pytest.raises(ConfigError, match=message):
        ColocatedPipeline(device="cpu", **options)
    leftovers.assert_clean()


def test_one_worker_gets_every_core():
    from splitwiser.config import EngineConfig

    config = EngineConfig(colocated=True, num_prompt_workers=3, num_token_workers=3)
    assert workers_per_role(config) == {"colocated": 1}
    assert config.threads_per_worker() == max(1, os.cpu_count() or 1)
