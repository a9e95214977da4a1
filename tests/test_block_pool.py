"""Pure logic, no processes: the block pool (reference counts, LRU free list, the prefix cache),
the hash chain, and admission with a cached prefix (kv/block_pool.py, core/scheduler.py)."""

from __future__ import annotations

import pytest

from splitwiser.core.request import Request
from splitwiser.core.scheduler import Scheduler
from splitwiser.kv.block_pool import BlockPool, block_hashes
from splitwiser.outputs import RequestMetrics
from splitwiser.sampling import SamplingParams

B = 16


def _req(rid: int, prompt: list[int], max_new: int = 8, salt: str | None = None) -> Request:
    params = SamplingParams(max_new_tokens=max_new, cache_salt=salt)
    return Request(rid, None, list(prompt), params, 0, max_new, RequestMetrics(0.0))


def _publish_all(pool: BlockPool, req: Request) -> None:
    """As the core does once a request's prefill is reported done: its full blocks."""
    hashes = block_hashes(req.prompt_token_ids, B)
    for block, h in zip(req.block_ids, hashes):
        pool.publish(block, h)


def test_allocate_and_free_count_references_once():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1 and pool.num_used == 3
    assert not pool.can_allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.touch(a[:1])  # a second request shares the first block
    pool.free(a)
    assert pool.num_free == 3 and pool.ref_counts[a[0]] == 1
    pool.free(a[:1])
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(a[:1])


def test_the_hash_chain_covers_the_whole_prefix_and_the_salt():
    tokens = list(range(100, 164))  # 4 blocks
    hashes = block_hashes(tokens, B)
    assert len(hashes) == 4 and len(set(hashes)) == 4
    assert block_hashes(tokens[:40], B) == hashes[:2]  # only full blocks
    other = [7] + tokens[1:]  # the first token differs: no block equal, though 2..4 are
    assert not set(block_hashes(other, B)) & set(hashes)
    assert block_hashes(tokens, B, salt="a") != hashes != block_hashes(tokens, B, salt="b")
    known = hashes[:2]
    assert block_hashes(tokens, B, known=known) == hashes and known == hashes  # extended


def test_freed_blocks_stay_cached_and_are_evicted_lru_tail_blocks_first():
    pool = BlockPool(6)
    first = pool.allocate(3)
    hashes = block_hashes(list(range(48)), B)
    for block, h in zip(first, hashes):
        pool.publish(block, h)
    pool.free(first[::-1])  # a request frees tail first
    assert pool.num_free == 6 and pool.num_cached_free == 3
    assert pool.lookup(hashes) == first
    # the 3 never-used blocks go first, then the cached ones, the tail block first
    fresh = pool.allocate(4)
    assert set(fresh[:3]) == {3, 4, 5} and fresh[3] == first[2]
    assert pool.lookup(hashes) == first[:2] and pool.num_cached_free == 2
    assert pool.block_hash[first[2]] is None


def test_touch_takes_a_cached_block_out_of_the_free_list():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.publish(block, 42)
    pool.free([block])
    assert pool.num_free == 3 and pool.num_cached_free == 1
    pool.touch([block])
    assert pool.num_free == 2 and pool.num_cached_free == 0 and pool.ref_counts[block] == 1
    assert block not in pool.allocate(2)  # it is in use: never handed out


def test_a_second_copy_of_a_published_block_is_not_cached():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.publish(a, 7)
    pool.publish(b, 7)  # the same prefix computed twice at once: one entry stays
    assert pool.lookup([7]) == [a] and pool.block_hash[b] is None
    pool.free([b])
    assert pool.num_cached_free == 0


def test_reset_forgets_the_cache_only_when_no_block_is_in_use():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.publish(blocks[0], 1)
    assert not pool.reset() and pool.lookup([1]) == [blocks[0]]
    pool.free(blocks)
    assert pool.reset() and pool.lookup([1]) == [] and pool.num_cached_free == 0


def test_caching_off_finds_nothing():
    pool = BlockPool(4, enable_caching=False)
    (block,) = pool.allocate(1)
    pool.publish(block, 1)
    assert pool.lookup([1]) == [] and pool.block_hash[block] is None


@pytest.mark.parametrize(
    "prompt_len, hit_blocks",
    [(15, 0), (16, 0), (17, 1), (31, 1), (32, 1), (33, 2)],
)
def test_admission_hits_whole_blocks_but_never_the_last_prompt_token(prompt_len, hit_blocks):
    pool = BlockPool(64)
    sched = Scheduler(pool, B, max_prefill_tokens=1000)
    prompt = list(range(1, prompt_len + 1))
    seen = _req(0, prompt)
    sched.add(seen)
    sched.admit_next()
    _publish_all(pool, seen)
    sched.free(seen)
    again = _req(1, prompt)
    sched.add(again)
    assert sched.admit_next() is again
    assert again.num_computed_tokens == again.num_cached_tokens == hit_blocks * B
    assert again.block_ids[:hit_blocks] == seen_blocks(pool, prompt)[:hit_blocks]
    # blocks for the prefill and the first decode token, on demand: not for max_new_tokens
    assert len(again.block_ids) == -(-(prompt_len + 1) // B)
    assert sched.prefix_queries == 2 * prompt_len and sched.prefix_hits == hit_blocks * B


def seen_blocks(pool: BlockPool, prompt: list[int]) -> list[int]:
    return pool.lookup(block_hashes(prompt, B))


def test_admission_with_a_hit_counts_free_cached_blocks_against_the_pool():
    pool = BlockPool(4)
    sched = Scheduler(pool, B, max_prefill_tokens=1000)
    prompt = list(range(1, 50))  # 49 tokens: 3 full blocks, 4 blocks with its first decode
    seen = _req(0, prompt)
    sched.add(seen)
    sched.admit_next()
    _publish_all(pool, seen)
    sched.free(seen)
    assert pool.num_free == 4 and pool.num_cached_free == 3
    other = pool.allocate(1)  # someone else holds one block: 3 free, all of them cached
    again = _req(1, prompt)
    sched.add(again)
    # 3 cached blocks to take back plus 1 new: 4 needed, 3 free; nothing taken meanwhile
    assert sched.admit_next() is None and pool.num_cached_free == 3
    pool.free(other)
    assert sched.admit_next() is again and again.num_cached_tokens == 48


def test_different_salts_never_share_blocks():
    pool = BlockPool(16)
    sched = Scheduler(pool, B, max_prefill_tokens=1000)
    prompt = list(range(1, 40))
    a = _req(0, prompt, salt="a")
    sched.add(a)
    sched.admit_next()
    for block, h in zip(a.block_ids, block_hashes(prompt, B, salt="a")):
        pool.publish(block, h)
    for rid, salt, hit in ((1, "b", 0), (2, None, 0), (3, "a", 32)):
        req = _req(rid, prompt, salt=salt)
        sched.add(req)
        assert sched.admit_next() is req and req.num_cached_tokens == hit, salt


def test_the_watermark_holds_back_admissions_only_beside_running_requests():
    pool = BlockPool(200)  # a watermark of 2 blocks
    sched = Scheduler(pool, B, max_prefill_tokens=10_000)
    held = pool.allocate(190)
    big = _req(0, list(range(1, 130)))  # 129 tokens + 1: 9 blocks; 10 free
    sched.add(big)
    assert sched.next_prefill_batch(others_running=True) == []  # 10 - 9 < 2
    assert [r for r, _ in sched.next_prefill_batch(others_running=False)] == [big]
    pool.free(held)


def test_a_requeued_request_frees_its_blocks_and_resumes_from_its_own_cached_blocks():
    pool = BlockPool(16)
    sched = Scheduler(pool, B, max_prefill_tokens=1000)
    req = _req(0, list(range(1, 21)), max_new=40)  # 20 prompt tokens
    sched.add(req)
    sched.admit_next()
    req.output_token_ids = list(range(500, 520))  # 20 generated: 39 tokens written
    tokens = req.all_token_ids
    for block, h in zip(req.block_ids, block_hashes(tokens[:32], B)):
        pool.publish(block, h)  # what the core published as its blocks filled
    req.block_ids += pool.allocate(1)
    sched.requeue_front([req])  # preempted, or its worker was lost
    assert req.block_ids is None and pool.num_used == 0 and sched.waiting[0] is req
    assert sched.admit_next() is req
    # prefilled again: prompt + output but the last (39 tokens), from its 2 cached blocks
    assert req.num_prefill_tokens == 39 and req.num_computed_tokens == 32
    assert req.num_cached_tokens == 0  # what it found at its first admission
