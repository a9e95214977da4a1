"""The contract: greedy float32 tokens equal ``generate(do_sample=False)``, for Llama (GQA),
Qwen2, Mistral and OPT, in real worker processes, alone and 32 at once, 1+1 and 2+2 workers,
both handoff modes, both model front-ends (own code, Hugging Face modules), prompts prefilled
whole and in chunks; the colocated pipeline likewise (mixed steps of prefill chunks and
decodes); on CPU, and on CUDA (CUDA IPC, Triton decode kernel, CUDA graphs) where a GPU is
present."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from splitwiser import ColocatedPipeline, SamplingParams, SplitwiserPipeline
from tests.conftest import ARCHS, hf_greedy

# 1 token, around and at exact multiples of the block size (16), several blocks
PROMPT_LENS = [1, 2, 7, 15, 16, 17, 31, 32, 33, 48, 50, 64, 65, 80, 100, 127]
MAX_NEW = 20


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [PROMPT_LENS[i % len(PROMPT_LENS)] for i in range(n)]
    return [[rng.randrange(1, 1000) for _ in range(k)] for k in lens]


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(
    scope="module", params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_GPU])]
)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def references(reference_models, device):
    """``generate()`` on the same device: CUDA kernels round differently from CPU ones."""
    prompts = _prompts(32, seed=1)
    refs = {}
    for arch, model in reference_models.items():
        model = model if device == "cpu" else copy.deepcopy(model).to(device)
        refs[arch] = [hf_greedy(model, p, MAX_NEW) for p in prompts]
    return prompts, refs


# every architecture on its own model code; the Hugging Face front-end (same attention) too;
# a prefill budget of 24 tokens: the longer prompts (up to 127) are prefilled in chunks
CASES = (
    [(arch, 1, 1, "shared", "auto", 4096) for arch in ARCHS]
    + [(arch, 2, 2, "copy", "auto", 4096) for arch in ARCHS]
    + [(arch, 2, 2, "shared", "transformers", 4096) for arch in ("llama", "opt")]
    + [("llama", 2, 2, "shared", "auto", 4096), ("llama", 1, 1, "copy", "transformers", 4096)]
    + [(arch, 1, 2, "shared", "auto", 24) for arch in ARCHS]
    + [("llama", 2, 1, "shared", "transformers", 24)]
)


@pytest.mark.parametrize("arch, num_prompt, num_token, handoff, model_impl, budget", CASES)
def test_greedy_equals_generate(
    model_dirs, references, device, arch, num_prompt, num_token, handoff, model_impl, budget
):
    prompts, refs = references
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    with SplitwiserPipeline(
        model_dirs[arch],
        num_prompt_workers=num_prompt,
        num_token_workers=num_token,
        device=device,
        dtype="float32",
        kv_handoff=handoff,
        model_impl=model_impl,
        max_prefill_tokens=budget,
    ) as pipe:
        alone = pipe.generate([prompts[3]], params)[0]  # one request on an idle pipeline
        longest = pipe.generate([prompts[-1]], params)[0]  # 127 tokens, alone
        num_batches = pipe.stats()["phases"]["prefill_batches"] - 1
        together = pipe.generate(prompts, params)  # 32 concurrent requests
        stats = pipe.stats()
    assert stats["model_impl"] == ("transformers" if model_impl == "transformers" else "splitwiser")
    assert alone.token_ids == refs[arch][3]
    for i, out in enumerate(together):
        assert out.token_ids == refs[arch][i], f"prompt {i} ({len(prompts[i])} tokens) differs"
        assert out.finish_reason == "length"
        assert out.prompt_token_ids == prompts[i]
        m = out.metrics
        assert len(m.token_times) == MAX_NEW and m.ttft_s > 0 and m.e2e_s >= m.ttft_s
        assert m.handoff_s is not None and m.handoff_s >= 0
        assert (m.kv_bytes_copied > 0) == (handoff == "copy")
    assert stats["num_free_blocks"] == stats["num_kv_blocks"]  # every block back in the pool
    assert longest.token_ids == refs[arch][-1]
    assert num_batches == -(-len(prompts[-1]) // budget)  # chunks of the budget, or whole


# a step budget of 24 tokens over at most 12 running requests: prompts of up to 127 tokens are
# prefilled in chunks across several steps, mixed with the decodes of the others
COLOCATED_CASES = [(arch, "auto") for arch in ARCHS] + [("llama", "transformers")]


@pytest.mark.parametrize("arch, model_impl", COLOCATED_CASES)
def test_colocated_greedy_equals_generate(model_dirs, references, device, arch, model_impl):
    prompts, refs = references
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    with ColocatedPipeline(
        model_dirs[arch],
        device=device,
        dtype="float32",
        model_impl=model_impl,
        max_num_batched_tokens=24,
        max_num_seqs=12,
    ) as pipe:
        alone = pipe.generate([prompts[-1]], params)[0]  # 127 tokens: 6 chunks, then decode
        together = pipe.generate(prompts, params)
        stats = pipe.stats()
    assert alone.token_ids == refs[arch][-1]
    for i, out in enumerate(together):
        assert out.token_ids == refs[arch][i], f"prompt {i} ({len(prompts[i])} tokens) differs"
        assert out.finish_reason == "length" and len(out.metrics.token_times) == MAX_NEW
    phases = stats["phases"]
    assert phases["mixed_steps"] > 0 and phases["decode_steps"] > 0
    # every prompt token prefilled once, but what the prefix cache held (``prompts[-1]`` ran
    # alone first: all its blocks but the last come from the cache)
    cached = sum(out.num_cached_tokens for out in together)
    assert together[-1].num_cached_tokens == (len(prompts[-1]) - 1) // 16 * 16
    assert phases["prefill_tokens"] == len(prompts[-1]) + sum(map(len, prompts)) - cached
    assert stats["num_free_blocks"] == stats["num_kv_blocks"]
    assert set(stats["workers"]) == {"colocated"}
