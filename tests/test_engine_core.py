"""The engine core in one process: scripted worker messages in, messages to workers out.

No worker runs here: process creation is made to raise for every test of this module, so each
race that otherwise needs a SIGKILL (tests/test_recovery.py) is replayed message by message.
"""

from __future__ import annotations

import multiprocessing.process
import subprocess
import time
from collections import Counter

import pytest

from splitwiser.config import EngineConfig
from splitwiser.core import messages as m
from splitwiser.core.engine_core import EngineCore
from splitwiser.core.prompts import PromptChecker
from splitwiser.core.request import RequestStatus, seed_for_offset
from splitwiser.errors import KVCacheTooSmallError, SplitwiserError, WorkerCrashedError
from splitwiser.handoff import select_handoff
from splitwiser.models.default import build_tokenizer
from splitwiser.roles import make_roles
from splitwiser.roles.token import pick_token_worker
from splitwiser.runtime.supervisor import Supervisor
from splitwiser.sampling import SamplingParams

P0, P1, T0, T1 = ("prompt", 0), ("prompt", 1), ("token", 0), ("token", 1)
ALL_READY = {"prompt": [0, 1], "token": [0, 1]}


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the engine core tried to start a process")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def make_core(tokenizer):
    def make(num_blocks: int = 64, **options) -> EngineCore:
        # the same prompt in many requests here: no prefix caching unless a test asks for it
        # (test_core_orders.py and test_block_pool.py have it in every order)
        defaults = {"block_size": 4, "num_prompt_workers": 2, "num_token_workers": 2,
                    "enable_prefix_caching": False}  # fmt: skip
        config = EngineConfig(**defaults | options)
        checker = PromptChecker(tokenizer, len(tokenizer), max_model_len=128)
        handoff = select_handoff(config)
        return EngineCore(
            config, num_blocks, checker, (tokenizer.eos_token_id,), make_roles(config),
            chunked_prefill=handoff.allows_chunked_prefill,
        )  # fmt: skip

    return make


def submit(core, prompt=(5, 6, 7, 8, 9), **params):
    req = core.new_request(list(prompt), SamplingParams(**{"max_new_tokens": 4} | params))
    core.add_request(req)
    return req


def of_type(sends, cls, key=None):
    return [(k, msg) for k, msg in sends if isinstance(msg, cls) and key in (None, k)]


def prefill_done(core, key, prefill: m.PrefillMsg, first_tokens):
    msg = m.PrefillDoneMsg(
        request_ids=[r.request_id for r in prefill.requests],
        first_tokens=list(first_tokens),
        published_at=time.monotonic(),
        batch_tokens=sum(len(t) for t in prefill.token_ids),
        compute_s=0.01,
    )
    return core.on_message(key, msg)


def tokens(core, key, pairs, finished=None):
    ids, toks = [rid for rid, _ in pairs], [tok for _, tok in pairs]
    return core.on_message(key, m.TokensMsg(ids, toks, finished or [False] * len(ids)))


def run_to_decode(core, req, first=100):
    """Schedule ``req``'s prefill on prompt worker 0, finish it, hand it off: -> the handoff."""
    ((key, prefill),) = of_type(core.schedule({"prompt": [0]}), m.PrefillMsg)
    assert key == P0
    assert prefill_done(core, P0, prefill, [first] * len(prefill.requests)) == []
    ((key, handoff),) = of_type(core.schedule({"token": [0]}), m.HandoffMsg)
    return key, handoff


def hand_off_new(core, n: int) -> tuple[list, list]:
    """Submit ``n`` requests, prefill them in one batch on prompt worker 0, offer both token
    workers: -> (the requests, the token worker each handoff went to, in order)."""
    reqs = [submit(core) for _ in range(n)]
    ((_, prefill),) = of_type(core.schedule({"prompt": [0]}), m.PrefillMsg)
    prefill_done(core, P0, prefill, [100] * n)
    return reqs, [k for k, _ in of_type(core.schedule({"token": [0, 1]}), m.HandoffMsg)]


def test_no_process_can_start():
    with pytest.raises(AssertionError, match="tried to start a process"):
        multiprocessing.get_context("spawn").Process(target=print).start()


def test_handoff_only_after_the_prefill_published_its_blocks(make_core):
    core = make_core()
    req = submit(core)
    sends = core.schedule(ALL_READY)
    ((key, prefill),) = sends  # a prefill batch, and nothing for a token worker yet
    assert key in (P0, P1) and isinstance(prefill, m.PrefillMsg)
    assert prefill.token_ids == [[5, 6, 7, 8, 9]]
    assert req.status is RequestStatus.PREFILLING and req.owner == key
    assert core.schedule(ALL_READY) == []  # still prefilling: no handoff, no second batch
    assert prefill_done(core, key, prefill, [100]) == []
    assert req.status is RequestStatus.DECODING and req.owner is None
    assert req.handle._tokens == [100]  # the first token reaches the caller at once
    ((tkey, handoff),) = core.schedule(ALL_READY)
    assert isinstance(handoff, m.HandoffMsg) and tkey[0] == "token"
    assert handoff.block_ids == prefill.block_ids[0] and handoff.prompt_len == 5
    assert handoff.first_token == 100 and req.owner == tkey
    assert core.busy_workers() == {tkey}


def test_decode_to_max_tokens_frees_every_block(make_core):
    core = make_core(num_blocks=16)
    req = submit(core, max_new_tokens=3)
    assert core.pool.num_free == 16
    key, _ = run_to_decode(core, req)
    assert core.pool.num_free == 16 - 2  # 5 prompt + 3 new - 1 uncached = 7 tokens
    assert tokens(core, key, [(req.request_id, 101)]) == []
    # the worker's own stop rule ended it at the third token: no abort needed
    assert tokens(core, key, [(req.request_id, 102)], finished=[True]) == []
    out = req.handle.result(timeout=0)
    assert out.token_ids == [100, 101, 102] and out.finish_reason == "length"
    assert core.pool.num_free == 16 and core.requests == {} and core.busy_workers() == set()


def test_eos_ends_a_request_unless_ignore_eos(make_core, tokenizer):
    eos = tokenizer.eos_token_id
    core = make_core()
    a, b = submit(core, max_new_tokens=8), submit(core, max_new_tokens=8, ignore_eos=True)
    ((_, prefill),) = of_type(core.schedule({"prompt": [0]}), m.PrefillMsg)
    assert len(prefill.requests) == 2
    prefill_done(core, P0, prefill, [100, 100])
    core.schedule({"token": [0]})
    tokens(core, T0, [(a.request_id, eos), (b.request_id, eos)], finished=[True, False])
    assert a.handle.result(timeout=0).finish_reason == "stop"
    assert not b.handle.done() and b.owner == T0


def test_token_workers_share_load_by_live_requests_with_no_fill(make_core):
    core = make_core(decode_fill_seqs=0)
    reqs, workers = hand_off_new(core, 3)
    assert sorted(workers) == [T0, T0, T1]
    assert core.loads("token") == {0: 2, 1: 1}
    # one of worker 0's requests ends: the next one goes to either, both now own one
    done = next(r for r in reqs if r.owner == T0)
    tokens(core, T0, [(done.request_id, 101)], finished=[True])
    assert core.loads("token") == {0: 1, 1: 1}


def test_token_workers_fill_one_batch_before_the_next_gets_any(make_core):
    core = make_core(decode_fill_seqs=2)
    reqs, workers = hand_off_new(core, 5)
    # worker 0 to 2, worker 1 to 2, then the least loaded (the lower index among equals)
    assert workers == [T0, T0, T1, T1, T0]
    # one of worker 1's requests ends: worker 1, at 1, is the one under the fill
    r = next(r for r in reqs if r.owner == T1)
    tokens(core, T1, [(r.request_id, 101)], finished=[True])
    (late,), workers = hand_off_new(core, 1)
    assert workers == [T1] and late.owner == T1


@pytest.mark.parametrize(
    "ready, loads, fill, picked",
    [
        ([0, 1], {}, 16, 0),  # all idle: the first
        ([0, 1], {1: 3}, 16, 1),  # the fullest under the fill
        ([0, 1], {0: 16, 1: 3}, 16, 1),  # worker 0 is full
        ([0, 1], {0: 16, 1: 16}, 16, 0),  # both full: the least loaded, lower index first
        ([0, 1], {0: 17, 1: 16}, 16, 1),
        ([1], {0: 0, 1: 20}, 16, 1),  # only ready workers count
        ([0, 1], {0: 3, 1: 2}, 0, 1),  # no fill: the least loaded
        ([0, 1, 2], {0: 5, 1: 9, 2: 1}, 8, 0),  # 1 is past the fill: 0 is the fullest under
    ],
)
def test_pick_token_worker(ready, loads, fill, picked):
    assert pick_token_worker(ready, Counter(loads), fill) == picked


def test_abort_while_waiting(make_core):
    core = make_core()
    req = submit(core)
    assert core.abort(req.request_id) == []  # no worker involved
    out = req.handle.result(timeout=0)
    assert out.finish_reason == "abort" and out.token_ids == []
    assert core.schedule(ALL_READY) == [] and core.pool.num_free == 64


def test_abort_while_prefilling_frees_blocks_when_the_batch_ends(make_core):
    core = make_core()
    req = submit(core)
    ((key, prefill),) = core.schedule({"prompt": [0]})
    assert core.abort(req.request_id) == []  # a prefill batch cannot be stopped midway
    assert not req.handle.done() and core.pool.num_free < 64  # the worker still writes
    assert prefill_done(core, key, prefill, [100]) == []
    out = req.handle.result(timeout=0)
    assert out.finish_reason == "abort" and out.token_ids == []
    assert core.pool.num_free == 64
    assert core.schedule(ALL_READY) == []  # never handed off


def test_abort_while_decoding_waits_for_the_release(make_core):
    core = make_core()
    req = submit(core)
    key, _ = run_to_decode(core, req)
    tokens(core, key, [(req.request_id, 101)])
    ((akey, abort),) = core.abort(req.request_id)
    assert akey == key and isinstance(abort, m.AbortMsg) and abort.request_ids == [req.request_id]
    assert not req.handle.done() and core.pool.num_free < 64
    tokens(core, key, [(req.request_id, 102)])  # a step already in flight: dropped
    core.on_message(key, m.ReleasedMsg([req.request_id]))
    out = req.handle.result(timeout=0)
    assert out.finish_reason == "abort" and out.token_ids == [100, 101]
    assert core.pool.num_free == 64 and core.busy_workers() == set()


def test_stop_string_across_token_boundaries(make_core, tokenizer):
    ids = tokenizer("hello world").input_ids
    pieces = [tokenizer.decode([i]) for i in ids]
    stop = pieces[1][-1] + pieces[2][0]  # the end of one token and the start of the next
    assert stop not in pieces[0] + pieces[1]
    core = make_core()
    req = submit(core, max_new_tokens=10, stop=[stop])
    ((_, prefill),) = core.schedule({"prompt": [0]})
    prefill_done(core, P0, prefill, [ids[0]])
    ((key, _),) = core.schedule({"token": [0]})
    assert tokens(core, key, [(req.request_id, ids[1])]) == []
    ((_, abort),) = tokens(core, key, [(req.request_id, ids[2])])  # the worker knows no text
    assert isinstance(abort, m.AbortMsg)
    core.on_message(key, m.ReleasedMsg([req.request_id]))
    out = req.handle.result(timeout=0)
    assert out.finish_reason == "stop" and out.token_ids == ids[:3]
    full = tokenizer.decode(ids[:3])
    assert out.text == full[: full.index(stop)] and stop not in out.text


def test_lost_prompt_worker_runs_its_batch_again(make_core):
    core = make_core()
    req = submit(core)
    ((_, first),) = core.schedule({"prompt": [0]})
    num_blocks = len(req.block_ids)
    core.on_worker_lost(P0, "died (exit code -9)")
    # its blocks went back (the dead worker writes nothing more); it waits at the head
    assert req.status is RequestStatus.WAITING and req.block_ids is None
    assert core.pool.num_free == 64 and core.scheduler.waiting[0] is req
    assert core.num_retried == 1 and core.busy_workers() == set()
    ((key, again),) = core.schedule({"prompt": [1]})
    assert key == P1 and again.token_ids == first.token_ids
    assert [len(b) for b in again.block_ids] == [num_blocks]
    # a message of the dead worker that arrives late changes nothing
    assert prefill_done(core, P0, first, [100]) == [] and req.handle._tokens == []


def test_lost_token_worker_resumes_with_the_output_so_far(make_core):
    core = make_core(enable_prefix_caching=True)
    req = submit(core, max_new_tokens=6, temperature=1.0, seed=7, min_new_tokens=3)
    run_to_decode(core, req)
    tokens(core, T0, [(req.request_id, 101)])
    tokens(core, T0, [(req.request_id, 102)])
    core.on_worker_lost(T0, "died (exit code -9)")
    ((_, prefill),) = core.schedule({"prompt": [1], "token": [1]})
    # prefilled again: the prompt and every generated token but the last (the next input),
    # but for the prompt's first block, published at its prefill and found in the cache
    assert prefill.token_ids == [[9, 100, 101]] and prefill.num_computed == [4]
    assert prefill.requests[0].max_new_tokens == 6 - 2
    assert prefill.requests[0].seed == seed_for_offset(7, 2)
    assert prefill.requests[0].params.min_new_tokens == 3 - 2  # EOS masked one token more
    assert prefill_done(core, P1, prefill, [999]) == []  # its sampled token is dropped
    ((key, handoff),) = core.schedule({"token": [1]})
    assert key == T1 and handoff.first_token == 102 and handoff.prompt_len == 7
    tokens(core, T1, [(req.request_id, 103)])
    tokens(core, T1, [(req.request_id, 104)])
    tokens(core, T1, [(req.request_id, 105)], finished=[True])
    out = req.handle.result(timeout=0)
    assert out.token_ids == [100, 101, 102, 103, 104, 105] and out.finish_reason == "length"
    assert core.pool.num_free == 64


def test_lost_worker_with_only_an_abort_outstanding_frees_the_blocks(make_core):
    core = make_core()
    req = submit(core)
    key, _ = run_to_decode(core, req)
    core.abort(req.request_id)
    core.on_worker_lost(key, "died (exit code -9)")  # it never acknowledged
    assert req.handle.result(timeout=0).finish_reason == "abort"
    assert core.pool.num_free == 64 and core.num_retried == 0


def test_request_lost_again_without_progress_fails(make_core):
    core = make_core(max_request_retries=2)
    req = submit(core)
    for _ in range(2):
        core.schedule({"prompt": [0]})
        core.on_worker_lost(P0, "died (exit code -9)")
    core.schedule({"prompt": [0]})
    core.on_worker_lost(P0, "died (exit code -9)")
    with pytest.raises(WorkerCrashedError, match="run again 2 times in a row"):
        req.handle.result(timeout=0)
    assert core.pool.num_free == 64 and core.requests == {}


def test_worker_error_fails_its_batch(make_core):
    core = make_core()
    a, b = submit(core), submit(core)
    ((key, prefill),) = core.schedule({"prompt": [0]})
    core.on_message(key, m.WorkerErrorMsg([a.request_id, b.request_id], "CUDA error: boom"))
    for req in (a, b):
        with pytest.raises(SplitwiserError, match="splitwiser-prompt-0: CUDA error: boom"):
            req.handle.result(timeout=0)
    assert core.pool.num_free == 64 and core.busy_workers() == set()


def test_full_pool_admission_waits_and_oversized_requests_are_rejected(make_core):
    core = make_core(num_blocks=4)  # 16 tokens
    with pytest.raises(KVCacheTooSmallError, match="needs 5 KV blocks .* only 4"):
        submit(core, prompt=range(10), max_new_tokens=10)
    a = submit(core, prompt=range(1, 9), max_new_tokens=5)  # 12 tokens: 3 blocks
    b = submit(core, prompt=range(1, 9), max_new_tokens=5)
    sends = core.schedule(ALL_READY)
    assert [msg.requests[0].request_id for _, msg in sends] == [a.request_id]  # b waits
    assert b.status is RequestStatus.WAITING and b.block_ids is None
    assert core.pool.num_free == 1
    core.abort(a.request_id)  # prefilling: b still waits until its blocks are free
    assert core.schedule(ALL_READY) == []
    ((key, prefill),) = sends
    prefill_done(core, key, prefill, [100])
    ((_, msg),) = core.schedule(ALL_READY)
    assert msg.requests[0].request_id == b.request_id


def test_whole_prompts_follow_the_token_budget_and_worker_room(make_core):
    core = make_core(max_prefill_tokens=10, kv_handoff="copy")  # copy handoff: no chunks
    reqs = [submit(core, prompt=range(1, 7)) for _ in range(6)]  # 6 tokens each
    # one request per batch (two exceed the budget), one batch per worker and tick, at most
    # two in flight per worker
    for _ in range(2):
        sends = core.schedule({"prompt": [0, 1]})
        assert sorted(k for k, _ in sends) == [P0, P1]
        assert all(msg.token_ids == [list(range(1, 7))] for _, msg in sends)
    assert core.loads("prompt") == {0: 2, 1: 2}
    assert [r.status for r in reqs[4:]] == [RequestStatus.WAITING] * 2
    assert core.schedule({"prompt": [0, 1]}) == []


def test_a_prompt_over_the_budget_is_prefilled_in_chunks_in_order(make_core):
    core = make_core(max_prefill_tokens=10)
    prompt = list(range(1, 26))  # 25 tokens: chunks of 10, 10 and 5
    req = submit(core, prompt=prompt)
    for start in (0, 10, 20):
        sends = core.schedule(ALL_READY)
        ((key, prefill),) = sends  # the next chunk only once the last one is in the blocks
        assert prefill.requests[0].request_id == req.request_id
        assert prefill.num_computed[0] == start
        assert prefill.token_ids[0] == prompt[start : start + 10]
        assert core.schedule(ALL_READY) == []
        prefill_done(core, key, prefill, [100 + start])
    assert req.handle._tokens == [120]  # the first token of the last chunk alone
    ((_, handoff),) = core.schedule(ALL_READY)
    assert handoff.prompt_len == 25 and handoff.first_token == 120


def test_the_budget_left_by_a_prompt_goes_to_a_chunk_of_the_next(make_core):
    core = make_core(max_prefill_tokens=10)
    a, b = submit(core, prompt=range(1, 7)), submit(core, prompt=range(1, 10))
    ((_, prefill),) = core.schedule({"prompt": [0]})
    assert [r.request_id for r in prefill.requests] == [a.request_id, b.request_id]
    assert prefill.token_ids == [list(range(1, 7)), list(range(1, 5))]  # 6 + 4 = the budget


def test_a_lost_prompt_worker_restarts_a_chunked_prefill_from_the_start(make_core):
    core = make_core(max_prefill_tokens=10, enable_prefix_caching=True)
    req = submit(core, prompt=range(1, 26))
    ((key, first),) = core.schedule({"prompt": [0]})
    prefill_done(core, key, first, [100])
    ((key, second),) = core.schedule({"prompt": [0]})
    assert second.num_computed == [10]
    core.on_worker_lost(key, "died (exit code -9)")  # its chunk may be half written
    ((_, again),) = core.schedule({"prompt": [1]})
    # again from the last block the first chunk filled (published at its report), not from
    # where the lost chunk began
    assert again.num_computed == [8] and again.token_ids == [list(range(9, 19))]
    assert req.handle._tokens == []


def test_restart_rate_spent_stops_the_role_and_fails_everything(make_core):
    class Worker:  # the supervisor's view of a process, without one
        def __init__(self, role, index):
            self.cfg = type("Cfg", (), {"role": role, "index": index})
            self.ready, self.alive = object(), True
            self.process = type("Process", (), {"exitcode": -9})

        def is_alive(self):
            return self.alive

        def age_s(self):
            return 0.0

        silent_s = age_s

        def stop(self, timeout_s):
            self.alive = False

    config = EngineConfig(num_token_workers=1, max_worker_restarts=2)
    supervisor = Supervisor(config, Worker)
    supervisor.start_all()
    core = make_core(max_worker_restarts=2)
    req = submit(core)
    run_to_decode(core, req)
    for _ in range(3):  # crashes in a loop: the third restart is refused within the window
        worker = supervisor.workers[T0]
        worker.alive = False
        (lost,) = supervisor.find_lost(core.busy_workers())
        supervisor.remove(lost.worker)
        core.on_worker_lost(T0, lost.reason)
        supervisor.replace("token", 0)
    assert supervisor.stopped_role() == "token"
    assert supervisor.health()["token"]["restarts_in_window"] == 2
    core.fail_all(WorkerCrashedError("every token worker is lost"))
    with pytest.raises(WorkerCrashedError):
        req.handle.result(timeout=0)
    assert core.pool.num_free == 64 and core.requests == {}


def test_the_phase_log_keeps_each_batch_and_step_as_the_worker_timed_it(make_core):
    core = make_core()
    req = submit(core)
    ((_, prefill),) = core.schedule({"prompt": [0]})
    core.on_message(P0, m.PrefillDoneMsg([req.request_id], [100], 50.0, None, 5, 0.25))
    core.schedule({"token": [0]})
    core.on_message(T0, m.TokensMsg([req.request_id], [101], [False], step_s=0.5, started_at=60.0))
    assert [(r.kind, r.worker, r.start_s, r.end_s, r.num_tokens) for r in core.phase_log] == [
        ("prefill", P0, 49.75, 50.0, 5), ("decode", T0, 60.0, 60.5, 1),
    ]  # fmt: skip
    assert core.phase_counters["prefill_tokens"] == 5 and core.phase_counters["decode_steps"] == 1
