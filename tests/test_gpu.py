"""CUDA-only behaviour (the exactness contract on CUDA lives in test_exactness.py): bfloat16 by
default, the KV pool sized from free device memory, device memory and workers released on
close. Every test here skips without a GPU."""

from __future__ import annotations

import gc

import pytest
import torch

from splitwiser import SamplingParams, SplitwiserPipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_defaults_to_bfloat16_and_sizes_the_pool_by_gpu_memory_utilization(model_dirs):
    free_before, total = torch.cuda.mem_get_info()
    with SplitwiserPipeline(model_dirs["llama"], device="cuda") as pipe:
        assert pipe.dtype == torch.bfloat16 and pipe.device.type == "cuda"
        pool_bytes = pipe.num_kv_blocks * pipe.stats()["kv_bytes_per_block"]
        # 0.9 of the device, less what was in use and the workers' estimated share (a tiny
        # model: a few GiB at most for four workers' contexts and workspaces)
        budget = 0.9 * total - (total - free_before)
        assert budget - 8 * 2**30 <= pool_bytes <= budget
        outs = pipe.generate(
            [[1, 2, 3], [4] * 40], SamplingParams(max_new_tokens=8, ignore_eos=True)
        )
        assert [len(o.token_ids) for o in outs] == [8, 8]


def test_close_releases_device_memory_and_workers(model_dirs, leftovers):
    gc.collect()
    torch.cuda.empty_cache()
    allocated = torch.cuda.memory_allocated()
    with SplitwiserPipeline(
        model_dirs["llama"], device="cuda", num_prompt_workers=2, num_token_workers=2
    ) as pipe:
        pipe.generate([[5] * 20] * 8, SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert torch.cuda.memory_allocated() > allocated  # weights and pool live in this process
    del pipe
    gc.collect()
    assert torch.cuda.memory_allocated() == allocated
    leftovers.assert_clean()
