"""Chunked prefill in the data plane, in one process: a prompt prefilled chunk by chunk over its
cached prefix gives the whole prompt's logits and K/V; prefill chunks and decode tokens of other
requests mixed in one forward give what each gives alone; and greedy generation driven by chunks
alone equals Hugging Face ``generate()``. Each architecture, both model front-ends."""

from __future__ import annotations

import pytest
import torch

from splitwiser.kv.pool import KVLayout, allocate_pool
from splitwiser.layers.attention import AttentionMetadata, decode_attention
from splitwiser.models.loader import load_model
from splitwiser.models.shape import ModelShape
from splitwiser.worker.model_runner import ModelRunner, PrefillSeq
from tests.conftest import ARCHS, hf_greedy

CPU = torch.device("cpu")
IMPLS = ("splitwiser", "transformers")
TOL = dict(rtol=1e-4, atol=1e-4)  # float32: chunks reduce in another order than whole prompts


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    """One load per (arch, front-end): the transformers front-end switches its model's attention
    to the paged one, so the ``generate()`` references (``reference_models``) are other loads."""
    cache = {}

    def get(arch: str, impl: str):
        if (arch, impl) not in cache:
            cache[arch, impl] = load_model(model_dirs[arch], dtype=torch.float32, device=CPU).model
        return cache[arch, impl]

    return get


def _setup(hf_models, arch: str, impl: str, block_size: int, num_blocks: int = 64):
    model = hf_models(arch, impl)
    runner = ModelRunner(model, block_size, CPU, model_impl=impl, max_model_len=256)
    layout = KVLayout.from_shape(ModelShape.from_hf(model.config), block_size, torch.float32)
    return runner, lambda: allocate_pool(layout, num_blocks, CPU)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _slots(block_ids: list[int], n: int, block_size: int) -> torch.Tensor:
    return torch.tensor(
        [block_ids[p // block_size] * block_size + p % block_size for p in range(n)]
    )


# --------------------------------------------------------------------------- attention alone


@pytest.mark.parametrize("prefix_lens", [(6, 0), (0, 0)], ids=["cached-prefix", "prompt-starts"])
def test_chunked_attention_sees_each_request_prefix_and_its_chunk_causally(prefix_lens):
    """Two decode tokens, then chunks of 5 and 3 over cached prefixes of ``prefix_lens`` tokens,
    against float64 attention of each query over its own request's keys up to its position.
    With no prefix cached the chunks take SDPA's own causal mask (``chunks_start_prompts``)."""
    g = torch.Generator().manual_seed(0)
    bs, heads, kv_heads, d = 4, 4, 2, 8
    query_lens = [1, 1, 5, 3]
    context_lens = [7, 2, 5 + prefix_lens[0], 3 + prefix_lens[1]]
    pool = torch.randn((1, 2, 40 * bs, kv_heads, d), generator=g)
    table = torch.randperm(40, generator=g)[:12].view(4, 3).to(torch.int32)
    starts = [0, 1, 2, 7, 10]
    meta = AttentionMetadata(
        is_prefill=False, kv_cache=pool, block_size=bs, slot_mapping=torch.zeros(0),
        query_starts=torch.tensor(starts), max_query_len=5,
        padded_index=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), block_table=table,
        context_lens=torch.tensor(context_lens, dtype=torch.int32), max_context_len=7,
        num_decodes=2, max_chunk_context_len=max(context_lens[2:]),
        chunks_start_prompts=not any(prefix_lens),
    )  # fmt: skip
    q = torch.randn((10, heads, d), generator=g)
    out = decode_attention(q, meta, 0, 0.3)
    for r, (n, ctx) in enumerate(zip(query_lens, context_lens)):
        slots = _slots(table[r].tolist(), ctx, bs)
        k, v = (pool[0, i, slots].double().repeat_interleave(2, 1) for i in (0, 1))  # [ctx, h, D]
        scores = torch.einsum("qhd,khd->hqk", q[starts[r] : starts[r + 1]].double(), k) * 0.3
        positions = torch.arange(ctx - n, ctx)
        scores.masked_fill_(torch.arange(ctx)[None, :] > positions[:, None], float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        torch.testing.assert_close(out[starts[r] : starts[r + 1]].double(), ref, **TOL)


def test_chunks_after_one_shared_prefix_take_the_cascade_and_equal_plain_attention(monkeypatch):
    """Three chunks whose requests share 2 cached blocks (then 0, 3 and 5 cached tokens of their
    own): the prefix's attention once for all queries, merged with each chunk's own by their
    log-sum-exps (sdpa._cascade), equals float64 attention over each request's whole context."""
    from splitwiser.layers.attention import sdpa

    monkeypatch.setattr(sdpa, "CASCADE_MIN_TOKENS", 8)
    calls = []
    cascade = sdpa._cascade
    monkeypatch.setattr(sdpa, "_cascade", lambda *a: calls.append(a[5]) or cascade(*a))
    g = torch.Generator().manual_seed(1)
    bs, heads, kv_heads, d = 4, 4, 2, 8
    query_lens, own_cached = [5, 3, 4], [0, 3, 5]
    context_lens = [8 + c + n for c, n in zip(own_cached, query_lens)]  # 13, 14, 17
    pool = torch.randn((1, 2, 40 * bs, kv_heads, d), generator=g)
    ids = torch.randperm(40, generator=g).tolist()
    table = torch.tensor(
        [ids[:2] + ids[2 + 3 * r : 5 + 3 * r] for r in range(3)], dtype=torch.int32
    )
    starts = [0, 5, 8, 12]
    meta = AttentionMetadata(
        is_prefill=False, kv_cache=pool, block_size=bs, slot_mapping=torch.zeros(0),
        query_starts=torch.tensor(starts), max_query_len=5,
        padded_index=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13]), block_table=table,
        context_lens=torch.tensor(context_lens, dtype=torch.int32), max_context_len=17,
        num_decodes=0, max_chunk_context_len=17, chunks_start_prompts=False,
    )  # fmt: skip
    q = torch.randn((12, heads, d), generator=g)
    out = decode_attention(q, meta, 0, 0.3)
    assert calls == [2]  # two shared blocks
    for r, (n, ctx) in enumerate(zip(query_lens, context_lens)):
        slots = _slots(table[r].tolist(), ctx, bs)
        k, v = (pool[0, i, slots].double().repeat_interleave(2, 1) for i in (0, 1))
        scores = torch.einsum("qhd,khd->hqk", q[starts[r] : starts[r + 1]].double(), k) * 0.3
        positions = torch.arange(ctx - n, ctx)
        scores.masked_fill_(torch.arange(ctx)[None, :] > positions[:, None], float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        torch.testing.assert_close(out[starts[r] : starts[r + 1]].double(), ref, **TOL)


# --------------------------------------------------------------------------- one prompt in chunks

PROMPT_LEN = 29
SPLITS = [  # (block_size, chunk sizes)
    (4, [4, 4, 4, 4, 4, 4, 4, 1]),  # at block boundaries, then a chunk of one token
    (4, [3] * 9 + [2]),  # inside blocks
    (4, [1, 3, 12, 5, 8]),  # a one-token prompt start, chunks over several blocks
    (16, [7, 7, 7, 7, 1]),
    (16, [16, 13]),
]


@pytest.mark.parametrize("block_size,sizes", SPLITS, ids=lambda x: str(x))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_prefilled_in_chunks_equals_the_whole_prompt(
    hf_models, arch, impl, block_size, sizes
):
    assert sum(sizes) == PROMPT_LEN
    runner, new_pool = _setup(hf_models, arch, impl, block_size)
    prompt, blocks = _prompt(PROMPT_LEN, seed=1), [9, 3, 17, 5, 11, 2, 30, 8]
    chunked, whole = new_pool(), new_pool()
    done = 0
    for n in sizes:
        logits = runner.prefill([PrefillSeq(prompt[done : done + n], blocks, done)], chunked)
        done += n
        # the last logits of the prompt so far, prefilled whole
        ref = runner.prefill([PrefillSeq(prompt[:done], blocks)], whole)
        torch.testing.assert_close(logits, ref, **TOL)
    slots = _slots(blocks, PROMPT_LEN, block_size)
    torch.testing.assert_close(chunked[:, :, slots], whole[:, :, slots], **TOL)


# --------------------------------------------------------------------------- a mixed batch


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_request_alone(hf_models, arch, impl):
    """Two prefill chunks (one over a cached prefix, one a prompt's start) and four decode tokens
    of other requests, interleaved, in one forward."""
    bs = 4
    runner, new_pool = _setup(hf_models, arch, impl, bs)
    cached = {"p1": 6, "p2": 0, "d1": 4, "d2": 8, "d3": 13, "d4": 1}
    new = {"p1": 9, "p2": 5, "d1": 1, "d2": 1, "d3": 1, "d4": 1}
    tokens = {r: _prompt(cached[r] + new[r], seed=i) for i, r in enumerate(cached)}
    blocks = {r: list(range(5 * i, 5 * i + 5)) for i, r in enumerate(cached)}
    mixed, alone = new_pool(), new_pool()
    for pool in (mixed, alone):  # the same cached prefixes in both pools
        prefixes = [PrefillSeq(tokens[r][: cached[r]], blocks[r]) for r in cached if cached[r]]
        runner.prefill(prefixes, pool)

    def seq(r: str) -> PrefillSeq:
        return PrefillSeq(tokens[r][cached[r] :], blocks[r], cached[r])

    order = ["d1", "p1", "d2", "d3", "p2", "d4"]
    logits = runner.prefill([seq(r) for r in order], mixed)
    assert logits.shape == (len(order), hf_models(arch, impl).config.vocab_size)
    for row, r in enumerate(order):
        ref = runner.prefill([seq(r)], alone)[0]
        torch.testing.assert_close(logits[row], ref, **TOL)
    torch.testing.assert_close(mixed, alone, **TOL)


def test_prefill_refuses_a_staging_buffer_or_missing_blocks_for_a_cached_prefix(hf_models):
    runner, new_pool = _setup(hf_models, "llama", "splitwiser", 4)
    pool = new_pool()
    with pytest.raises(ValueError, match="whole prompts"):
        runner.prefill([PrefillSeq([5, 6], [0, 1], num_computed=3)], pool, contiguous_slots=True)
    with pytest.raises(ValueError, match="need 2 blocks"):
        runner.prefill([PrefillSeq([5, 6], [0], num_computed=3)], pool)


# --------------------------------------------------------------------------- greedy generation

CHUNK, MAX_NEW = 7, 8


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_in_chunks_equals_generate(hf_models, reference_models, arch, impl):
    """Two requests stepped together the way a colocated engine steps them: every step runs
    each one's next prompt chunk (at most 7 tokens) or its decode token in one ``prefill`` call;
    the second starts three steps later, while the first decodes: steps mix chunks and decode
    tokens."""
    runner, new_pool = _setup(hf_models, arch, impl, 4)
    pool = new_pool()
    prompts = [_prompt(19, seed=5), _prompt(11, seed=6)]
    blocks = [list(range(0, 10)), list(range(10, 20))]
    computed, outputs, first_step = [0, 0], [[], []], [0, 3]
    num_mixed = 0
    for step in range(40):
        active = [i for i in (0, 1) if first_step[i] <= step and len(outputs[i]) < MAX_NEW]
        if not active:
            break
        seqs = []
        for i in active:
            prompt, done = prompts[i], computed[i]
            chunk = prompt[done : done + CHUNK] if done < len(prompt) else [outputs[i][-1]]
            seqs.append(PrefillSeq(chunk, blocks[i], done))
        num_mixed += len({len(s.token_ids) == 1 for s in seqs}) == 2
        next_tokens = runner.prefill(seqs, pool).argmax(-1).tolist()
        for i, seq, token in zip(active, seqs, next_tokens):
            computed[i] += len(seq.token_ids)
            if computed[i] >= len(prompts[i]):  # the prompt is in: each step's token is output
                outputs[i].append(token)
    assert num_mixed >= 2  # steps with both a prompt chunk and a decode token
    for prompt, out in zip(prompts, outputs):
        assert out == hf_greedy(reference_models[arch], prompt, MAX_NEW)
