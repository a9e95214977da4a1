"""The baselines: static batches through ``generate()`` give each request the tokens it would get
alone, stop each request at its own length or EOS, and time tokens per decoding step."""

from __future__ import annotations

import json
import random

import pytest

from splitwiser import (
    BatchedPipeline,
    ConfigError,
    InvalidRequestError,
    SamplingParams,
    SequentialPipeline,
)
from tests.conftest import EOS_PROMPT, build_model_dir, hf_greedy


@pytest.fixture(scope="module")
def batched(model_dirs):
    return BatchedPipeline(model_dirs["llama"], device="cpu", batch_size=5)


def test_batched_tokens_equal_generate_alone(batched, reference_models):
    """Left padding must not change any request's greedy tokens (float32)."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(1, 40))] for _ in range(11)]
    params = [SamplingParams(max_new_tokens=rng.randint(1, 12), ignore_eos=True) for _ in prompts]
    outs = batched.generate(prompts, params)
    assert [o.request_id for o in outs] == list(range(11))
    for prompt, sp, out in zip(prompts, params, outs):
        assert out.token_ids == hf_greedy(reference_models["llama"], prompt, sp.max_new_tokens)
        assert out.finish_reason == "length"
        m = out.metrics
        assert len(m.token_times) == sp.max_new_tokens
        assert m.token_times == sorted(m.token_times) and m.finish_time == m.token_times[-1]


def test_batched_stops_each_request_at_its_eos(eos_model_dir):
    path, free_run, eos = eos_model_dir
    with BatchedPipeline(path, device="cpu", batch_size=4) as pipe:
        outs = pipe.generate_batch(
            [EOS_PROMPT, EOS_PROMPT[:3]],
            [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12)],
        )
    assert outs[0].token_ids == free_run[:6] and outs[0].finish_reason == "stop"
    assert len(outs[0].metrics.token_times) == 6


def test_batched_rejects_what_it_cannot_do(batched, model_dirs):
    with pytest.raises(ConfigError, match="batch_size"):
        BatchedPipeline(model_dirs["llama"], device="cpu", batch_size=0)
    with pytest.raises(InvalidRequestError, match="1 to 5"):
        batched.generate_batch([[1]] * 6, [SamplingParams()] * 6)
    mixed = [SamplingParams(), SamplingParams(temperature=0.7)]
    with pytest.raises(InvalidRequestError, match="share their sampling"):
        batched.generate_batch([[1], [2]], mixed)


def test_ignore_eos_keeps_a_pad_token(batched):
    """With ignore_eos the eos list is empty; transformers 5.17's generate() then takes the pad
    token from eos_token_id[0] unless one is set, and fails on a model without a pad token."""
    config = batched.model.generation_config
    saved, config.pad_token_id = config.pad_token_id, None
    try:
        gen = batched._generation_config(SamplingParams(ignore_eos=True), 4)
    finally:
        config.pad_token_id = saved
    assert gen.eos_token_id == [] and gen.pad_token_id == batched.pad_token_id is not None


def test_a_sliding_window_caps_the_baselines_context_as_splitwisers(tmp_path):
    """The baselines serve the context Splitwiser serves (``ModelShape.max_model_len``): a
    Mistral window below max_position_embeddings caps prompt + output tokens for both."""
    path = build_model_dir(tmp_path, "mistral")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"sliding_window": 32}))
    with SequentialPipeline(path, device="cpu") as pipe:
        assert pipe.checker.max_model_len == 32 < config["max_position_embeddings"]
        with pytest.raises(InvalidRequestError, match="context is 32 tokens"):
            pipe.generate([[5] * 32])
        (out,) = pipe.generate([[5] * 20], SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
