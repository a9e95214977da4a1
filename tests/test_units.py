"""Pure logic, no processes: scheduler, sampling, stop rules, metrics, config."""

from __future__ import annotations

import pytest
import torch

from splitwiser import ConfigError, EngineConfig, InvalidRequestError, SamplingParams
from splitwiser.core.prompts import stop_reason
from splitwiser.core.request import Request, RequestStatus
from splitwiser.core.scheduler import Scheduler
from splitwiser.kv.block_pool import BlockPool
from splitwiser.kv.pool import slots_for
from splitwiser.outputs import RequestMetrics
from splitwiser.sampling import sample_token, token_generator


def _req(rid: int, prompt_len: int, max_new: int = 4) -> Request:
    params = SamplingParams(max_new_tokens=max_new)
    # a prompt of its own: no request waits for another's prefix
    return Request(rid, None, [rid + 1] * prompt_len, params, 0, max_new, RequestMetrics(0.0))


def test_blocks_needed_excludes_the_last_token():
    # 16 prompt + 1 new token: the new token is never cached, so one block is enough
    assert _req(0, 16, 1).num_blocks_needed(16) == 1
    assert _req(0, 16, 2).num_blocks_needed(16) == 2
    assert _req(0, 1, 1).num_blocks_needed(16) == 1


def test_slots_follow_block_table():
    assert slots_for([3, 7, 9], 18, 16).tolist() == [*range(48, 64), 112, 113]
    assert slots_for([5], 1, 16).tolist() == [80]


def _ids(batch) -> list[tuple[int, int]]:
    """``[(request id, tokens to prefill)]`` of a prefill batch."""
    return [(req.request_id, n) for req, n in batch]


def test_scheduler_batches_fcfs_under_token_budget():
    sched = Scheduler(BlockPool(100), block_size=16, max_prefill_tokens=100, chunked=False)
    for i, n in enumerate([60, 30, 30, 200]):
        sched.add(_req(i, n))
    plan = sched.schedule({0: 0, 1: 0})
    assert [_ids(b) for _, b in plan] == [[(0, 60), (1, 30)], [(2, 30)]]
    assert all(r.status is RequestStatus.WAITING for _, b in plan for r, _ in b)  # the core's
    # an over-budget prompt still runs, whole and alone
    assert _ids(sched.next_prefill_batch()) == [(3, 200)]


def test_chunked_scheduler_fills_the_budget_with_a_chunk():
    sched = Scheduler(BlockPool(100), block_size=16, max_prefill_tokens=100)
    for i, n in enumerate([60, 30, 250]):
        sched.add(_req(i, n))
    assert _ids(sched.next_prefill_batch()) == [(0, 60), (1, 30), (2, 10)]
    assert not sched.waiting  # the rest of request 2 comes back through continue_prefill


def test_scheduler_waits_for_blocks_and_keeps_order():
    alloc = BlockPool(3)
    sched = Scheduler(alloc, block_size=16, max_prefill_tokens=1000)
    big, small = _req(0, 40), _req(1, 4)  # 3 blocks, 1 block
    held = alloc.allocate(1)
    sched.add(big)
    sched.add(small)
    assert sched.next_prefill_batch() == []  # the head waits; nothing jumps the queue
    alloc.free(held)
    assert _ids(sched.next_prefill_batch()) == [(0, 40)]
    sched.free(big)
    assert alloc.num_free == 3


def test_scheduler_respects_batches_in_flight():
    sched = Scheduler(BlockPool(100), 16, 1000, max_batches_per_prompt_worker=2)
    sched.add(_req(0, 4))
    assert sched.schedule({0: 2}) == []  # worker 0 is full: nothing dispatched
    plan = sched.schedule({0: 2, 1: 1})
    assert [(w, _ids(b)) for w, b in plan] == [(1, [(0, 4)])]


def test_stop_reason():
    p = SamplingParams(max_new_tokens=3)
    assert stop_reason(5, 1, 3, p, (0,)) is None
    assert stop_reason(0, 1, 3, p, (0,)) == "stop"
    assert stop_reason(5, 3, 3, p, (0,)) == "length"
    assert stop_reason(0, 1, 3, SamplingParams(ignore_eos=True), (0,)) is None
    assert stop_reason(9, 1, 3, SamplingParams(stop_token_ids=(9,)), (0,)) == "stop"


def test_sampling_params_validation():
    for bad in (
        dict(max_new_tokens=0),
        dict(max_new_tokens=-1),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-1),
        dict(stop=[""]),
    ):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)


def test_seeded_sampling_depends_on_seed_and_index_only():
    logits = torch.randn(1000)
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    draws = [sample_token(logits, p, token_generator(p, 7, i, "cpu")) for i in range(20)]
    again = [sample_token(logits, p, token_generator(p, 7, i, "cpu")) for i in range(20)]
    assert draws == again
    assert len(set(draws)) > 1  # it does sample
    top50 = set(torch.topk(logits, 50).indices.tolist())
    assert set(draws) <= top50
    assert sample_token(logits, SamplingParams(), None) == int(logits.argmax())


def test_metrics_definitions():
    m = RequestMetrics(arrival_time=10.0, token_times=[10.5, 10.7, 11.0], finish_time=11.0)
    assert m.ttft_s == pytest.approx(0.5)
    assert m.e2e_s == pytest.approx(1.0)
    assert m.tpot_s == pytest.approx((1.0 - 0.5) / 2)
    assert m.itl_s == pytest.approx([0.2, 0.3])
    assert RequestMetrics(0.0, [1.0], 1.0).tpot_s is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_prompt_workers=0), "num_prompt_workers"),
        (dict(num_token_workers=0), "num_token_workers"),
        (dict(kv_handoff="nvlink"), "kv_handoff"),
        (dict(num_kv_blocks=0), "num_kv_blocks"),
        (dict(block_size=0), "block_size"),
        (dict(model_impl="vllm"), "model_impl"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kwargs)


def test_no_cuda_context_in_a_process_that_never_loaded_the_driver():
    from splitwiser.runtime.cuda_context import cuda_context_active

    # torch itself does not load the driver library until CUDA is used
    assert cuda_context_active() is torch.cuda.is_initialized()
