"""Generation features through real workers: EOS, stop strings, one new token, seeded sampling,
the online path (submit, stream, cancel) and the baseline pipeline."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from splitwiser import ColocatedPipeline, SamplingParams, SequentialPipeline, SplitwiserPipeline
from splitwiser.errors import InvalidRequestError, PipelineClosedError
from tests.conftest import EOS_PROMPT, hf_greedy

PROMPT = EOS_PROMPT


@pytest.fixture(scope="module")
def pipe(eos_model_dir):
    with SplitwiserPipeline(eos_model_dir[0], device="cpu", dtype="float32") as p:
        yield p


@pytest.fixture(scope="module")
def colocated(eos_model_dir):
    with ColocatedPipeline(eos_model_dir[0], device="cpu", dtype="float32") as p:
        yield p


def test_eos_ends_the_request_like_generate(pipe, eos_model_dir):
    path, free_run, eos = eos_model_dir
    out = pipe.generate([PROMPT], SamplingParams(max_new_tokens=12))[0]
    assert out.token_ids == free_run[:6] and out.token_ids[-1] == eos
    assert out.finish_reason == "stop"
    with SequentialPipeline(path, device="cpu") as seq:
        assert (
            seq.generate([PROMPT], SamplingParams(max_new_tokens=12))[0].token_ids == free_run[:6]
        )
    ignored = pipe.generate([PROMPT], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert ignored.token_ids == free_run and ignored.finish_reason == "length"


def test_min_new_tokens_masks_eos_like_generate(pipe, colocated, eos_model_dir):
    """EOS cannot be drawn before ``min_new_tokens``: generate(min_new_tokens=8) token for token
    (the free run draws it 6th), split and colocated, then it ends the request when drawn."""
    from transformers import AutoModelForCausalLM

    path, free_run, eos = eos_model_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = hf_greedy(model, PROMPT, 16, eos=[eos], min_new_tokens=8)
    assert expected[:5] == free_run[:5] and expected[5] != eos and len(expected) >= 8
    params = SamplingParams(max_new_tokens=16, min_new_tokens=8)
    for out in [pipe.generate([PROMPT], params)[0], colocated.generate([PROMPT], params)[0]]:
        assert out.token_ids == expected
        assert out.finish_reason == ("stop" if expected[-1] == eos else "length")


def test_logprobs_are_generates_scores_split_and_colocated(pipe, colocated, eos_model_dir):
    """Each token's log-probability and the top N's are log_softmax of generate()'s logits at
    that step (the raw distribution, before temperature or masks), first token included; a
    request that asks for none gets None beside one that asks."""
    from transformers import AutoModelForCausalLM

    path, free_run, _ = eos_model_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             eos_token_id=[])  # fmt: skip
    ref_lps = [torch.log_softmax(step[0].float(), dim=-1) for step in ref.logits]
    asked = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3)
    for p in (pipe, colocated):
        out, plain = p.generate([PROMPT, PROMPT], [asked, SamplingParams(max_new_tokens=6)])
        assert plain.logprobs is None and out.token_ids == free_run[:6]
        assert len(out.logprobs) == 6
        for token, lp, want in zip(out.token_ids, out.logprobs, ref_lps):
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(want[token].item(), abs=1e-4)
            values, indices = want.topk(3)
            assert [t for t, _ in lp.top] == indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    sampled = SamplingParams(max_new_tokens=4, temperature=1.5, seed=3, logprobs=0)
    out = pipe.generate([PROMPT], sampled)[0]  # the drawn token's, whatever was drawn
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert all(lp.top == [] and lp.logprob <= 0 for lp in out.logprobs)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_max_new_tokens_one(pipe, eos_model_dir):
    out = pipe.generate([PROMPT, [3]], SamplingParams(max_new_tokens=1))
    assert out[0].token_ids == eos_model_dir[1][:1]
    assert all(len(o.token_ids) == 1 and o.finish_reason == "length" for o in out)
    assert out[0].metrics.tpot_s is None and out[0].metrics.handoff_s is None
    assert pipe.stats()["num_free_blocks"] == pipe.num_kv_blocks


def test_stop_string_cuts_text_and_frees_blocks(pipe, eos_model_dir):
    tok = pipe.tokenizer
    free_run = eos_model_dir[1]
    full = tok.decode(free_run[:5], skip_special_tokens=True)
    stop = full[len(full) // 2 :][:3]  # a piece of the text, possibly across tokens
    assert stop.strip(), "the test needs a visible stop string"
    out = pipe.generate([PROMPT], SamplingParams(max_new_tokens=12, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and full.startswith(out.text)
    assert out.token_ids == free_run[: len(out.token_ids)] and len(out.token_ids) <= 5
    assert pipe.stats()["num_free_blocks"] == pipe.num_kv_blocks


def test_seeded_sampling_is_reproducible(pipe):
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, seed=1234, ignore_eos=True)
    a = pipe.generate([PROMPT] * 3, p)
    b = pipe.generate([PROMPT], p)
    assert a[0].token_ids == a[1].token_ids == a[2].token_ids == b[0].token_ids
    other = pipe.generate([PROMPT], SamplingParams(**{**vars(p), "seed": 99}))[0]
    assert other.token_ids != a[0].token_ids  # deterministic: these two seeds differ


def test_submit_streams_tokens_in_order(pipe, eos_model_dir):
    handle = pipe.submit(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
    streamed = list(handle.stream(timeout=30))
    out = handle.result(timeout=30)
    assert streamed == out.token_ids == eos_model_dir[1][:8]
    assert handle.done()


def test_cancel_returns_partial_output(pipe):
    handle = pipe.submit(PROMPT, SamplingParams(max_new_tokens=240, ignore_eos=True))
    next(iter(handle.stream(timeout=30)))
    handle.cancel()
    out = handle.result(timeout=30)
    assert out.finish_reason == "abort" and 1 <= len(out.token_ids) < 240
    assert pipe.stats()["num_free_blocks"] == pipe.num_kv_blocks


def test_text_prompts_round_trip(pipe):
    out = pipe.generate("The capital of France is", SamplingParams(max_new_tokens=4))[0]
    assert out.prompt == "The capital of France is"
    assert out.prompt_token_ids == pipe.tokenizer("The capital of France is").input_ids
    assert out.text == pipe.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_result_and_stream_time_out_then_the_request_goes_on(pipe, eos_model_dir):
    handle = pipe.submit(PROMPT, SamplingParams(max_new_tokens=200, ignore_eos=True))
    with pytest.raises(TimeoutError, match="did not finish in 0.01 s"):
        handle.result(timeout=0.01)
    first = next(iter(handle.stream(timeout=30)))
    assert first == eos_model_dir[1][0]  # the timeout cancelled nothing
    handle.cancel()
    assert handle.result(timeout=30).finish_reason == "abort"


def test_phase_log_since_keeps_only_what_began_after(pipe):
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    t0 = time.monotonic()
    pipe.generate([PROMPT], params)
    t1 = time.monotonic()
    pipe.generate([PROMPT, PROMPT[:3]], params)
    later = pipe.phase_log(t1)
    assert later and all(r.start_s >= t1 for r in later)
    assert sum(r.kind == "prefill" for r in later) >= 1
    assert len(pipe.phase_log(t0)) > len(later)
    assert pipe.phase_log(time.monotonic()) == []
    assert [r for r in pipe.phase_log() if r.start_s >= t1] == later


def test_health_degraded_while_a_worker_restarts_then_closed(
    model_dirs, reference_models, leftovers
):
    params = SamplingParams(max_new_tokens=3)
    pipe = SplitwiserPipeline(model_dirs["llama"], device="cpu")
    try:
        assert pipe.stats()["health"] == "ok"
        os.kill(pipe.workers()["splitwiser-token-0"]["pid"], signal.SIGKILL)
        seen, deadline = set(), time.monotonic() + 60
        while "ok" not in seen or "degraded" not in seen:
            assert time.monotonic() < deadline, f"health went through {seen}"
            health = pipe.stats()["health"]
            if health == "degraded" or "degraded" in seen:
                seen.add(health)
            time.sleep(0.005)
        assert pipe.stats()["restarts"]["token"] == 1
        served = pipe.generate([[7, 8, 9]], params)[0].token_ids
    finally:
        pipe.close()
    assert pipe.stats()["health"] == "closed"
    with pytest.raises(PipelineClosedError, match="closed"):
        pipe.submit([7, 8, 9], params)
    with pytest.raises(PipelineClosedError):
        pipe.generate([[7, 8, 9]], params)
    assert served == hf_greedy(reference_models["llama"], [7, 8, 9], 3)
    leftovers.assert_clean()


def test_generate_command_prints_each_prompt_with_its_continuation(eos_model_dir, pipe):
    from click.testing import CliRunner

    from splitwiser.cli.generate import generate

    prompts = ["The capital of France is", "Once upon a time"]
    outs = pipe.generate(prompts, SamplingParams(max_new_tokens=5))
    args = ["--model", eos_model_dir[0], "--max-new-tokens", "5", *prompts]
    done = CliRunner().invoke(generate, args)
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [f"{o.prompt}{o.text}  [{o.finish_reason}]" for o in outs]
    done = CliRunner().invoke(generate, ["--json", *args])
    lines = [json.loads(line) for line in done.output.splitlines()]
    assert [(d["prompt"], d["text"], d["token_ids"]) for d in lines] == [
        (o.prompt, o.text, o.token_ids) for o in outs
    ]
    assert all(d["finish_reason"] == "length" and d["ttft_s"] > 0 for d in lines)
