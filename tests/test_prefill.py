"""The compiled RMSNorm and RoPE (``fuse=True``, as CUDA serving builds the own model code) are
compiled once, at start-up: no prompt length, batch of prompts, prefill chunk or decode batch
size compiles them again. A recompile in serving costs a request seconds on a GPU."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from splitwiser.kv.pool import KVLayout, allocate_pool
from splitwiser.models import llama
from splitwiser.models.shape import ModelShape
from splitwiser.worker.decode_batch import DecodeBatch
from splitwiser.worker.model_runner import ModelRunner, PrefillSeq

BLOCK_SIZE = 16
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")),
    reason="inductor on the CPU needs a C++ compiler",
)


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class Blocks:
    """Consecutive block ids from the start of the pool, handed out again for every batch."""

    def __init__(self):
        self.next = 0

    def take(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK_SIZE)
        self.next += n
        return list(range(self.next - n, self.next))


def _prompts(lens: list[int]) -> list[PrefillSeq]:
    blocks = Blocks()
    return [PrefillSeq([3 + (7 * i + j) % 400 for j in range(n)], blocks.take(n))
            for i, n in enumerate(lens)]  # fmt: skip


def _num_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_no_prompt_length_or_batch_size_recompiles():
    hf = _tiny_llama()
    torch._dynamo.reset()  # compiles of other tests in this process must not hide ours
    before = _num_graphs()
    runner = ModelRunner(hf, BLOCK_SIZE, CPU, max_model_len=256, fuse=True)
    model = runner.model
    assert model.rms_norm is not llama.rms_norm and model.rotate is not llama.rotate, (
        "compiling failed: the model stayed unfused (the log says why)"
    )
    warmed = _num_graphs()
    assert warmed > before  # the start-up compiled, and the counter sees it

    layout = KVLayout.from_shape(ModelShape.from_hf(hf.config), BLOCK_SIZE, torch.float32)
    pool = allocate_pool(layout, 64, CPU)
    grown = []  # (the input, graphs it added)

    def check(label) -> None:
        nonlocal warmed
        if _num_graphs() > warmed:
            grown.append((label, _num_graphs() - warmed))
            warmed = _num_graphs()

    # single prompts of 1 token, around block boundaries, long; batches of mixed lengths
    for lens in ([5], [1], [2], [16], [17], [33], [100], [64, 20], [7, 9, 11], [1, 1], [250]):
        runner.prefill(_prompts(lens), pool)
        check(lens)
    # a chunk over its cached prefix, mixed with two decode tokens (the colocated step)
    cached = _prompts([64, 21, 21])  # the blocks of each request's full context
    runner.prefill([PrefillSeq(s.token_ids[: len(s.token_ids) - 24 if i == 0 else -1],
                               s.block_ids) for i, s in enumerate(cached)], pool)  # fmt: skip
    mixed = [PrefillSeq(cached[0].token_ids[40:], cached[0].block_ids, 40)]
    mixed += [PrefillSeq(s.token_ids[-1:], s.block_ids, 20) for s in cached[1:]]
    runner.prefill(mixed, pool)
    check("a chunk and two decodes")
    # decode batches of 1, 3 and 8 rows, as a token worker runs them (eager on the CPU)
    for num_rows in (1, 3, 8):
        batch = DecodeBatch(8, 4, 63, CPU)
        for row in range(num_rows):
            batch.add(list(range(4 * row, 4 * row + 4)), 10 + row, 7)
        runner.decode(batch, pool)
        check(f"decode of {num_rows}")
    assert grown == [], f"recompiled after start-up: (input, graphs it added) {grown}"


def test_fused_prefill_matches_the_eager_model():
    """The compiled functions compute what the eager ones do (float32, to rounding)."""
    hf = _tiny_llama()
    layout = KVLayout.from_shape(ModelShape.from_hf(hf.config), BLOCK_SIZE, torch.float32)
    logits = []
    for fuse in (False, True):
        runner = ModelRunner(hf, BLOCK_SIZE, CPU, max_model_len=256, fuse=fuse)
        logits.append(runner.prefill(_prompts([37, 5, 64]), allocate_pool(layout, 64, CPU)))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
