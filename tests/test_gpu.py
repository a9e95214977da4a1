"""The same exactness contract on CUDA (float32), with the CUDA IPC handoff. Skips without a GPU."""

from __future__ import annotations

import pytest
import torch

from splitwiser import SamplingParams, SplitwiserPipeline
from tests.conftest import hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("handoff", ["shared", "copy"])
def test_cuda_greedy_equals_generate(model_dirs, handoff):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32).cuda()
    prompts = [[(7 * i + j) % 900 + 1 for j in range(n)] for i, n in enumerate([1, 16, 17, 50] * 8)]
    refs = [hf_greedy(ref, p, 16) for p in prompts]
    with SplitwiserPipeline(
        model_dirs["llama"],
        device="cuda",
        dtype="float32",
        num_prompt_workers=2,
        num_token_workers=2,
        kv_handoff=handoff,
    ) as pipe:
        outs = pipe.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
        assert pipe.stats()["num_free_blocks"] == pipe.num_kv_blocks
    assert [o.token_ids for o in outs] == refs
