"""The fast data plane's parts against plain references, in one process: the paged attention
(torch path, and the Triton kernel through Triton's interpreter), the persistent decode batch,
on-device sampling, and the own model code against the Hugging Face modules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from splitwiser.layers import linear as linear_mod
from splitwiser.layers.attention import (
    AttentionMetadata,
    decode_attention,
    prefill_attention,
)
from splitwiser.layers.attention import cpu_paged as cpu_kernels
from splitwiser.models.registry import resolve_model_impl
from splitwiser.sampling import SamplingParams, sample_next, sample_token, token_generator
from splitwiser.worker.decode_batch import DecodeBatch
from splitwiser.worker.model_runner import ModelRunner, PrefillSeq, graph_batch_sizes
from tests.conftest import ARCHS

BS, KV_HEADS, HEADS, D = 4, 2, 8, 16


def _reference(q, k, v, scale, causal):
    """One request's attention with K/V heads repeated: [T, heads, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=causal, scale=scale)
    return out.transpose(0, 1)


def _paged_setup(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // BS) for n in lens)
    num_blocks = len(lens) * max_blocks + 1
    pool = torch.randn((2, 2, num_blocks * BS, KV_HEADS, D), generator=g)
    order = torch.randperm(num_blocks - 1, generator=g)  # blocks in no particular order
    table = order[: len(lens) * max_blocks].view(len(lens), max_blocks).to(torch.int32)
    meta = AttentionMetadata(
        is_prefill=False, kv_cache=pool, block_size=BS, slot_mapping=torch.zeros(0),
        block_table=table, context_lens=torch.tensor(lens, dtype=torch.int32),
        max_context_len=max(lens),
    )  # fmt: skip
    q = torch.randn((len(lens), HEADS, D), generator=g)
    return pool, table, meta, q


def _decode_reference(pool, table, lens, q, layer, scale):
    outs = []
    for i, n in enumerate(lens):
        slots = (table[i].long()[:, None] * BS + torch.arange(BS)).flatten()[:n]
        k, v = pool[layer, 0, slots], pool[layer, 1, slots]
        outs.append(_reference(q[i : i + 1], k, v, scale, causal=False)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("path", ["cpu_kernel", "gather"])
def test_decode_attention_reads_each_request_through_its_block_table(path, monkeypatch):
    if path == "cpu_kernel":
        assert cpu_kernels.available(), "the CPU paged decode kernel did not build here"
    else:
        monkeypatch.setattr(cpu_kernels, "supports", lambda *_: False)
    lens = [1, 4, 5, 17, 30]  # one token, exact blocks, a partial last block
    pool, table, meta, q = _paged_setup(lens)
    out = decode_attention(q, meta, 1, 0.3)
    ref = _decode_reference(pool, table, lens, q, 1, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_prefill_attention_of_packed_prompts_equals_each_prompt_alone():
    g = torch.Generator().manual_seed(1)
    lens = [3, 1, 9, 6]
    q = torch.randn((sum(lens), HEADS, D), generator=g)
    k, v = (torch.randn((sum(lens), KV_HEADS, D), generator=g) for _ in range(2))
    starts = torch.tensor([0, 3, 4, 13, 19])
    padded = [i * 9 + t for i, n in enumerate(lens) for t in range(n)]
    meta = AttentionMetadata(
        is_prefill=True, kv_cache=torch.empty(0), block_size=BS, slot_mapping=torch.zeros(0),
        query_starts=starts, max_query_len=9, padded_index=torch.tensor(padded),
    )  # fmt: skip
    out = prefill_attention(q, k, v, meta, 0.25)
    for i in range(len(lens)):
        a, b = int(starts[i]), int(starts[i + 1])
        ref = _reference(q[a:b], k[a:b], v[a:b], 0.25, causal=True)
        torch.testing.assert_close(out[a:b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [(8, 2, 32, 16), (32, 8, 64, 16), (14, 2, 64, 16), (4, 4, 128, 32), (6, 2, 24, 12)],
)  # the embedded model, Llama-3 and Qwen2 groups, no GQA, and a shape the kernel has no case for
def test_cpu_decode_kernel_reads_the_blocks_in_place(heads, kv_heads, head_dim, block_size):
    """Each query over its request's first ``context_lens`` keys, read through a table whose
    rows are a slice of a wider one, against float64 attention over the request's keys."""
    assert cpu_kernels.available()
    g = torch.Generator().manual_seed(heads * head_dim)
    lens = [1, block_size, block_size + 1, 3 * block_size - 5, 200]
    cols = -(-max(lens) // block_size)
    num_blocks = len(lens) * (cols + 2)
    k_cache, v_cache = (
        torch.randn((num_blocks, block_size, kv_heads, head_dim), generator=g) for _ in range(2)
    )
    wide = torch.randperm(num_blocks, generator=g)[: len(lens) * (cols + 2)].view(len(lens), -1)
    table = wide.to(torch.int32)[:, :cols]  # strided rows, as the decode batch's table
    q = torch.randn((len(lens), heads, head_dim), generator=g)
    out = cpu_kernels.paged_decode(q, k_cache, v_cache, table, torch.tensor(lens), 0.2)
    for i, n in enumerate(lens):
        keys = k_cache[table[i].long()].flatten(0, 1)[:n].double()  # [n, kv_heads, D]
        values = v_cache[table[i].long()].flatten(0, 1)[:n].double()
        ref = _reference(q[i : i + 1].double(), keys, values, 0.2, causal=False)[0]
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-5)


def test_cpu_decode_kernel_refuses_a_context_beyond_its_table():
    k_cache, table = torch.zeros((4, 16, 2, 32)), torch.zeros((1, 2), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="longer than its block table"):  # 33 > 2 blocks of 16
        cpu_kernels.paged_decode(torch.zeros((1, 8, 32)), k_cache, k_cache, table,
                                 torch.tensor([33]), 1.0)  # fmt: skip


KERNEL_FALLBACK = """
import logging, torch
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from splitwiser.layers.attention import cpu_paged as cpu_kernels
from tests.test_data_plane import _paged_setup, _decode_reference
from splitwiser.layers.attention import decode_attention
assert not cpu_kernels.available()
lens = [3, 9]
pool, table, meta, q = _paged_setup(lens, seed=4)
torch.testing.assert_close(decode_attention(q, meta, 0, 0.3),
                           _decode_reference(pool, table, lens, q, 0, 0.3), rtol=1e-5, atol=1e-5)
print("fallback ok")
"""


@pytest.mark.parametrize("env", [{"SPLITWISER_CPU_KERNELS": "0"}, {"CC": "/bin/false"}])
def test_decode_attention_gathers_where_the_cpu_kernel_cannot_build(env, tmp_path):
    """Switched off, or no working compiler (an empty kernel cache): one warning at most, and
    decode attention still right, on the gather path."""
    env = os.environ | env | {"SPLITWISER_CACHE": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", KERNEL_FALLBACK], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-3000:]
    if "CC" in env:
        assert "CPU paged decode kernel unavailable" in proc.stderr
    assert not list(tmp_path.rglob("*.so"))


TRITON_CHECK = """
import torch
from splitwiser.layers.attention import kv_blocks as _blocks, triton_paged as T
from tests.test_data_plane import _paged_setup, _decode_reference
lens = [1, 4, 5, 17, 70, 130]
pool, table, meta, q = _paged_setup(lens, seed=3)
out = T.paged_decode(q, *_blocks(meta, 0), table, meta.context_lens, 0.3)
ref = _decode_reference(pool, table, lens, q, 0, 0.3)
torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
print("triton ok")
"""


def test_triton_decode_kernel_matches_the_reference_in_the_interpreter():
    pytest.importorskip("triton", reason="triton is part of the test extra")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, cwd=root, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "triton ok" in proc.stdout, proc.stderr[-3000:]


def test_decode_batch_keeps_rows_packed_and_padding_on_the_scratch_block():
    batch = DecodeBatch(4, 3, scratch_block=9, device=torch.device("cpu"))
    assert batch.add([1, 2], 5, 11) == 0
    assert batch.add([3], 2, 12) == 1
    assert batch.add([4, 5, 6], 9, 13) == 2
    assert batch.remove(0) == 2  # the last row fills the hole
    assert batch.block_table.tolist() == [[4, 5, 6], [3, 9, 9], [9, 9, 9], [9, 9, 9]]
    assert batch.positions.tolist()[:3] == [9, 2, 0] and batch.host_positions == [9, 2]
    assert batch.input_ids.tolist()[:2] == [13, 12]
    batch.advance(torch.tensor([21, 22]))
    assert batch.input_ids.tolist()[:2] == [21, 22] and batch.positions.tolist()[:3] == [10, 3, 0]
    assert batch.max_context_len == 11
    assert batch.remove(1) is None and batch.num_rows == 1


def test_graph_batch_sizes_cover_every_batch():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(3) == [1, 2, 3]


def test_sampling_on_device_greedy_and_seeded():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((3, 500), generator=g)
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=5)
    rows = [(greedy, 0, 0), (sampled, 5, 3), (greedy, 0, 0)]
    tokens = sample_next(logits, rows)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    # a seeded row's token depends on (seed, index, logits) alone, not on its batch
    alone = sample_token(logits[1], sampled, token_generator(sampled, 5, 3, "cpu"))
    assert int(tokens[1]) == alone
    assert int(tokens[1]) in torch.topk(logits[1], 40).indices.tolist()
    draws = {sample_token(logits[1], sampled, token_generator(sampled, 5, i, "cpu"))
             for i in range(30)}  # fmt: skip
    assert len(draws) > 1


def test_cpu_float32_projections_run_on_onednn_and_equal_f_linear():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn((96, 64), generator=g), torch.randn(96, generator=g)
    fn = linear_mod.linear_for(w)
    assert fn is linear_mod._onednn_linear  # this torch (CPU build, oneDNN) has it
    for rows in (1, 7, 32, 300):
        x = torch.randn((rows, 64), generator=g)
        torch.testing.assert_close(fn(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fn(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert linear_mod.linear_for(w.to(torch.bfloat16)) is F.linear


def test_projections_fall_back_to_f_linear_where_onednn_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN in this build")

    monkeypatch.setattr(linear_mod, "_onednn_linear", broken)
    linear_mod._onednn_works.cache_clear()
    try:
        assert linear_mod.linear_for(torch.zeros((4, 4))) is F.linear
    finally:
        linear_mod._onednn_works.cache_clear()


@pytest.mark.parametrize("arch", ARCHS)
def test_own_model_code_gives_the_hugging_face_logits(reference_models, arch):
    hf = reference_models[arch]
    assert resolve_model_impl(hf.config) == "splitwiser"
    prompts = [[5, 9, 200, 31, 7], [44] * 11, [3]]
    pool = torch.zeros((hf.config.num_hidden_layers, 2, 64 * BS, 2 if arch != "opt" else 4, 16))
    runner = ModelRunner(hf, BS, torch.device("cpu"), model_impl="splitwiser", max_model_len=64)
    seqs = [PrefillSeq(p, list(range(5 * i, 5 * i + 5))) for i, p in enumerate(prompts)]
    logits = runner.prefill(seqs, pool)
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            ref = hf(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, rtol=1e-5, atol=1e-5)
