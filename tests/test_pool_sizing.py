"""The KV pool's size on CUDA under ``gpu_memory_utilization`` (vLLM's meaning: the fraction of
the device all of the pipeline's processes may use together), as arithmetic on numbers; one GPU
test checks the estimates against a real device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from splitwiser.config import EngineConfig
from splitwiser.errors import ConfigError
from splitwiser.kv import pool
from splitwiser.kv.pool import (
    LIBRARY_BYTES,
    WORKER_CONTEXT_BYTES,
    KVLayout,
    decode_workspace_bytes,
    default_num_blocks,
    gpu_kv_cache_bytes,
    prefill_activation_bytes,
    workers_device_bytes,
)

GiB = 1 << 30
# Llama-3-8B's shape in bfloat16: 128 KiB of K/V per token, 2 MiB per 16-token block
LLAMA_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, vocab_size=128256)
LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)


def budget(**overrides) -> int:
    args = dict(total_bytes=80 * GiB, used_bytes=16 * GiB, utilization=0.9, workers_bytes=6 * GiB,
                min_kv_bytes=1 * GiB, max_model_len=8192, num_workers=4)  # fmt: skip
    return gpu_kv_cache_bytes(**{**args, **overrides})


def test_the_pool_gets_the_fraction_less_what_is_in_use_and_what_the_workers_need():
    assert budget() == int(80 * GiB * 0.9) - 16 * GiB - 6 * GiB  # 50 GiB
    assert budget(utilization=0.5) == 40 * GiB - 22 * GiB
    # another process's 10 GiB is in use: the pool never counts on it
    assert budget(used_bytes=26 * GiB) == budget() - 10 * GiB


def test_a_fraction_that_leaves_no_room_says_what_is_needed():
    with pytest.raises(ConfigError) as error:
        budget(utilization=0.3, min_kv_bytes=3 * GiB)  # 24 - 16 - 6: 2 GiB left, 3 needed
    message = str(error.value)
    for words in ("gpu_memory_utilization 0.3 allows 24.00 GiB of the device's 80.00 GiB",
                  "16.00 GiB are in use", "4 worker(s) need about 6.00 GiB", "leaves 2.00 GiB",
                  "needs 3.00 GiB to hold one request of max_model_len (8192) tokens",
                  "raise gpu_memory_utilization to at least 0.32,"):  # fmt: skip
        assert words in message, message
    assert budget(utilization=0.3, min_kv_bytes=2 * GiB) == 2 * GiB  # exactly enough
    assert budget(utilization=0.32, min_kv_bytes=3 * GiB) >= 3 * GiB  # the advice works
    with pytest.raises(ConfigError, match="free device memory"):
        budget(used_bytes=79 * GiB, utilization=1.0)  # others hold the device: no fraction helps


def test_the_workers_estimate_adds_each_roles_context_workspace_and_graphs():
    config = EngineConfig(num_prompt_workers=2, num_token_workers=2, max_num_seqs=64)
    decode = decode_workspace_bytes(LLAMA_8B, LAYOUT, 64, 8192)
    prefill = prefill_activation_bytes(LLAMA_8B, LAYOUT, config.max_prefill_tokens)
    split = workers_device_bytes(config, LAYOUT, 8192, LLAMA_8B)
    assert split == (2 * (WORKER_CONTEXT_BYTES + LIBRARY_BYTES + prefill)
                     + 2 * (WORKER_CONTEXT_BYTES + decode))  # fmt: skip
    # an 8B model's prefill of 4096 tokens takes more than a GiB, a decode batch of 64 little
    assert 1 * GiB < prefill < 2 * GiB and decode < 512 << 20
    colocated = EngineConfig(colocated=True, max_num_seqs=128)
    decode_128 = decode_workspace_bytes(LLAMA_8B, LAYOUT, 128, 8192)
    assert workers_device_bytes(colocated, LAYOUT, 8192, LLAMA_8B, step_tokens=8192) == (
        WORKER_CONTEXT_BYTES + decode_128 + prefill_activation_bytes(LLAMA_8B, LAYOUT, 8192)
    )
    assert workers_device_bytes(config, LAYOUT, 8192) == 4 * (WORKER_CONTEXT_BYTES + LIBRARY_BYTES)


def test_cuda_default_sizes_the_pool_from_the_device_and_explicit_sizes_win(monkeypatch):
    """``default_num_blocks`` on a CUDA device as this process sees it: 80 GiB, 17 GiB in use."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (63 * GiB, 80 * GiB))
    cuda = torch.device("cuda", 0)
    config = EngineConfig(num_prompt_workers=2, num_token_workers=2)
    workers = workers_device_bytes(config, LAYOUT, 8192, LLAMA_8B)
    expected = (int(80 * GiB * 0.9) - 17 * GiB - workers) // LAYOUT.bytes_per_block
    assert default_num_blocks(LAYOUT, cuda, config, 8192, LLAMA_8B) == expected
    assert 24_000 < expected < 26_000  # about 49 GiB of 2 MiB blocks (vLLM: ~50 GiB here)
    half = EngineConfig(num_prompt_workers=2, num_token_workers=2, gpu_memory_utilization=0.5)
    fewer = expected - default_num_blocks(LAYOUT, cuda, half, 8192, LLAMA_8B)
    assert abs(fewer - 32 * 512) <= 1  # 32 GiB less
    explicit = EngineConfig(kv_cache_bytes=1 * GiB, gpu_memory_utilization=0.1)
    assert default_num_blocks(LAYOUT, cuda, explicit, 8192, LLAMA_8B) == 512
    with pytest.raises(ConfigError, match="gpu_memory_utilization 0.1 allows"):
        default_num_blocks(LAYOUT, cuda, EngineConfig(gpu_memory_utilization=0.1), 8192, LLAMA_8B)


def test_cpu_default_is_unchanged(monkeypatch):
    monkeypatch.setattr(pool, "shm_free_bytes", lambda: None)
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    config = EngineConfig(gpu_memory_utilization=0.1)  # no effect on CPU
    per_seq = layout.num_blocks_for(256) * layout.bytes_per_block
    expected = per_seq * config.max_num_seqs // layout.bytes_per_block
    assert default_num_blocks(layout, torch.device("cpu"), config, 256) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_process_together_stays_within_the_fraction_on_a_real_device(model_dirs):
    from splitwiser import SamplingParams, SplitwiserPipeline

    free_before, total = torch.cuda.mem_get_info()
    utilization = 0.6
    with SplitwiserPipeline(
        model_dirs["llama"], device="cuda", num_prompt_workers=2, num_token_workers=2,
        gpu_memory_utilization=utilization,
    ) as pipe:  # fmt: skip
        pool_bytes = pipe.num_kv_blocks * pipe.stats()["kv_bytes_per_block"]
        outs = pipe.generate([[5] * 200] * 8, SamplingParams(max_new_tokens=16, ignore_eos=True))
        assert [len(o.token_ids) for o in outs] == [16] * 8
        free_after, _ = torch.cuda.mem_get_info()
    # the estimates are from above: the workers' contexts, workspaces and graphs fit
    assert total - free_after <= utilization * total
    # and not far from above: the pool got most of what the fraction left
    assert pool_bytes >= utilization * total - (total - free_before) - 8 * GiB
