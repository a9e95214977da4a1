"""KV memory in real worker processes: blocks on demand, preemption by recompute, and automatic
prefix caching shared by every worker, each held to ``generate()``'s greedy float32 tokens.

The pure logic (block pool, hash chain, LRU, admission with a hit) is in test_block_pool.py; the
message orders (grants, preemptions, releases, losses, with the K/V modelled) in
test_core_orders.py."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from splitwiser import ColocatedPipeline, SamplingParams, SplitwiserPipeline
from tests.conftest import ARCHS, hf_greedy

BLOCK = 16
MAX_NEW = 12
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 1000) for _ in range(n)]


def _shared_prefix_prompts() -> tuple[list[int], list[tuple[list[int], int]]]:
    """A 48-token base prompt, then prompts sharing its first L tokens, each with the hit it
    must get once the base is cached: whole blocks of the shared part, and never the last
    prompt token (its logits give the first new token)."""
    rng = random.Random(3)
    base = _tokens(rng, 48)
    cases = [
        (base[:16] + _tokens(rng, 5), 16),  # shares exactly one block
        (base[:17] + _tokens(rng, 9), 16),  # one token past a block boundary
        (base[:31] + _tokens(rng, 2), 16),  # one short of two blocks
        (base[:32] + _tokens(rng, 1), 32),  # exactly two blocks, then its own token
        (base[:33] + _tokens(rng, 20), 32),
        (list(base), 32),  # the whole prompt seen before: all but its last block's tokens
        (base[:32], 16),  # a prompt of exactly two cached blocks: the last token is computed
        (base[:15], 0),  # under one block: nothing to hit
    ]
    return base, cases


@pytest.fixture(scope="module")
def prefix_refs(reference_models):
    base, cases = _shared_prefix_prompts()
    return {
        arch: [hf_greedy(model, p, MAX_NEW) for p in [base] + [p for p, _ in cases]]
        for arch, model in reference_models.items()
    }


KINDS = [(arch, "split") for arch in ARCHS] + [(arch, "colocated") for arch in ARCHS]


def _pipeline(kind: str, model_dir: str, **options):
    if kind == "colocated":
        return ColocatedPipeline(model_dir, device="cpu", dtype="float32", **options)
    return SplitwiserPipeline(model_dir, device="cpu", dtype="float32", **options)


@pytest.mark.parametrize("arch, kind", KINDS)
def test_shared_prefixes_of_every_alignment_equal_generate(model_dirs, prefix_refs, arch, kind):
    base, cases = _shared_prefix_prompts()
    refs = prefix_refs[arch]
    with _pipeline(kind, model_dirs[arch]) as pipe:
        first = pipe.generate([base], GREEDY)[0]
        outs = [pipe.generate([p], GREEDY)[0] for p, _ in cases]  # one at a time: each hits
        again = pipe.generate([p for p, _ in cases], GREEDY)  # all at once, all cached
        stats = pipe.stats()
    assert first.token_ids == refs[0] and first.num_cached_tokens == 0
    for i, ((prompt, hit), out) in enumerate(zip(cases, outs)):
        assert out.token_ids == refs[i + 1], f"case {i} ({len(prompt)} tokens) differs"
        assert out.num_cached_tokens == hit, f"case {i}: {out.num_cached_tokens} cached"
    for i, out in enumerate(again):
        assert out.token_ids == refs[i + 1], f"case {i} again differs"
        # each prompt itself was seen: its full blocks but the one holding its last token
        assert out.num_cached_tokens == (len(cases[i][0]) - 1) // BLOCK * BLOCK
    assert stats["num_used_blocks"] == 0 and stats["num_free_blocks"] == stats["num_kv_blocks"]
    assert stats["num_cached_blocks"] > 0
    queried = len(base) + 2 * sum(len(p) for p, _ in cases)
    assert stats["prefix_cache_queries"] == queried
    assert stats["prefix_cache_hits"] == sum(o.num_cached_tokens for o in outs + again)


def test_prefix_of_prompt_worker_0_is_reused_by_prompt_worker_1(model_dirs, reference_models):
    rng = random.Random(5)
    prefix, other = _tokens(rng, 64), _tokens(rng, 40)
    shared = prefix + _tokens(rng, 6)
    model = reference_models["llama"]
    with SplitwiserPipeline(
        model_dirs["llama"], num_prompt_workers=2, num_token_workers=1, device="cpu",
        dtype="float32", max_prefill_tokens=40,
    ) as pipe:  # fmt: skip
        first = pipe.generate([prefix], GREEDY)[0]  # prompt worker 0 (both idle: the first)
        since = time.monotonic()
        # ``other`` fills worker 0's batch; what ``shared`` has left to prefill (6 tokens and
        # its last cached one's block) goes to worker 1
        outs = pipe.generate([other, shared], GREEDY)
        batches = [r for r in pipe.phase_log(since) if r.kind == "prefill"]
    assert first.token_ids == hf_greedy(model, prefix, MAX_NEW)
    assert outs[0].token_ids == hf_greedy(model, other, MAX_NEW)
    assert outs[1].token_ids == hf_greedy(model, shared, MAX_NEW)
    assert outs[1].num_cached_tokens == 64
    assert sorted((r.worker, r.num_tokens) for r in batches) == [
        (("prompt", 0), 40),
        (("prompt", 1), 6),
    ]


def test_a_pool_too_small_for_all_preempts_and_every_output_is_exact(model_dirs, reference_models):
    """16 requests of 100 + 44 tokens: 9 blocks each when done; the pool has 40, so at most
    four finish together: requests are preempted, run again, and still equal generate()."""
    rng = random.Random(7)
    prompts = [_tokens(rng, 100) for _ in range(16)]
    params = SamplingParams(max_new_tokens=44, ignore_eos=True)
    refs = [hf_greedy(reference_models["qwen2"], p, 44) for p in prompts]
    for kind in ("split", "colocated"):
        options = dict(num_kv_blocks=40, enable_prefix_caching=False)
        if kind == "split":
            options |= dict(num_prompt_workers=1, num_token_workers=2)
        with _pipeline(kind, model_dirs["qwen2"], **options) as pipe:
            outs = pipe.generate(prompts, params)
            stats = pipe.stats()
        for i, out in enumerate(outs):
            assert out.token_ids == refs[i], f"{kind}: request {i} differs"
            assert out.finish_reason == "length"
        assert stats["num_preemptions"] > 0, kind
        assert stats["num_free_blocks"] == 40 and stats["num_used_blocks"] == 0


def test_seeded_sampling_is_the_same_with_and_without_preemption(model_dirs):
    rng = random.Random(8)
    prompts = [_tokens(rng, 60) for _ in range(10)]
    params = [
        SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=100 + i,
                       ignore_eos=True)
        for i in range(10)
    ]  # fmt: skip
    runs = {}
    for blocks in (None, 24):
        with SplitwiserPipeline(
            model_dirs["llama"], device="cpu", dtype="float32", num_kv_blocks=blocks,
            enable_prefix_caching=False,
        ) as pipe:  # fmt: skip
            runs[blocks] = [o.token_ids for o in pipe.generate(prompts, params)]
            preemptions = pipe.stats()["num_preemptions"]
        assert (preemptions > 0) == (blocks is not None)
    assert runs[24] == runs[None]


def test_a_late_grant_makes_a_request_sit_out_not_the_batch(model_dirs, reference_models):
    """No lookahead: a decoding request gets its next block only as it needs it, so the token
    worker is often ahead of its grant and the request sits steps out (worker/decoding.py)."""
    rng = random.Random(9)
    prompts = [_tokens(rng, n) for n in (15, 16, 17, 31, 33, 40)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    model = reference_models["mistral"]
    with SplitwiserPipeline(
        model_dirs["mistral"], device="cpu", dtype="float32", num_lookahead_blocks=0
    ) as pipe:
        outs = pipe.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model, prompt, 40)


def test_cache_salt_and_reset_keep_requests_apart(model_dirs):
    rng = random.Random(10)
    prompt = _tokens(rng, 50)
    with SplitwiserPipeline(model_dirs["opt"], device="cpu", dtype="float32") as pipe:
        salted = SamplingParams(max_new_tokens=4, cache_salt="tenant-a")
        other = SamplingParams(max_new_tokens=4, cache_salt="tenant-b")
        plain = SamplingParams(max_new_tokens=4)
        a = pipe.generate([prompt], salted)[0]
        cached = [pipe.generate([prompt], p)[0].num_cached_tokens for p in (other, plain, salted)]
        assert pipe.reset_prefix_cache()
        after_reset = pipe.generate([prompt], salted)[0]
        stats = pipe.stats()
    assert a.num_cached_tokens == 0
    assert cached == [0, 0, 48]  # another tenant, no salt: nothing; the same tenant: 3 blocks
    assert after_reset.num_cached_tokens == 0 and after_reset.token_ids == a.token_ids
    assert stats["num_used_blocks"] == 0


def test_no_prefix_caching_computes_every_prompt(model_dirs):
    prompt = _tokens(random.Random(11), 40)
    with SplitwiserPipeline(
        model_dirs["llama"], device="cpu", dtype="float32", enable_prefix_caching=False
    ) as pipe:
        outs = [pipe.generate([prompt], GREEDY)[0] for _ in range(2)]
        stats = pipe.stats()
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert outs[0].token_ids == outs[1].token_ids
    assert stats["prefix_cache_hits"] == 0 and stats["num_cached_blocks"] == 0
    assert stats["phases"]["prefill_tokens"] == 80


def test_a_killed_token_worker_while_prefix_blocks_are_shared(model_dirs, reference_models):
    """Requests share a cached prefix; their token worker is SIGKILLed mid-decode: the shared
    blocks stay (others reference them), the dead requests' own blocks go back, they resume
    with generate()'s tokens, and every reference count is back to zero at the end."""
    rng = random.Random(12)
    prefix = _tokens(rng, 48)
    prompts = [prefix + _tokens(rng, 5 + i) for i in range(6)]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    model = reference_models["llama"]
    with SplitwiserPipeline(
        model_dirs["llama"], num_prompt_workers=1, num_token_workers=2, device="cpu",
        dtype="float32",
    ) as pipe:  # fmt: skip
        pipe.generate([prefix], GREEDY)
        handles = [pipe.submit(p, params) for p in prompts]
        while sum(len(h._tokens) for h in handles) < 30:  # decoding on both token workers
            time.sleep(0.01)
        victim = pipe.workers()["splitwiser-token-0"]["pid"]
        os.kill(victim, signal.SIGKILL)
        outs = [h.result(timeout=120) for h in handles]
        stats = pipe.stats()
    assert stats["num_retried"] > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model, prompt, 60)
        assert out.num_cached_tokens == 48
    assert stats["num_used_blocks"] == 0 and stats["num_free_blocks"] == stats["num_kv_blocks"]
