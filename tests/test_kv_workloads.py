"""The workloads that show KV memory at work (prefix-repetition, multi-turn), the client that
asks for more tokens than it takes (--max-tokens-factor) and the KV cache figures of the bench,
as pure logic; tests/test_kv_workloads_runs.py runs them through real systems."""

from __future__ import annotations

import threading

import pytest

from splitwiser import ConfigError
from splitwiser.benchmark.metrics import RequestRecord, kv_cache_summary
from splitwiser.benchmark.multi_turn import message_lens
from splitwiser.benchmark.workloads import (
    TRACE_ATTRIBUTION,
    build_prompts,
    build_workload,
    read_trace,
    scale_lengths,
    trace_path,
)
from splitwiser.handle import RequestHandle
from splitwiser.models.default import build_tokenizer
from splitwiser.outputs import RequestMetrics, RequestOutput
from splitwiser.systems.http import prometheus_counters
from splitwiser.systems.replay import Schedule, replay_sequential, replay_submit


def workload(name, **kw):
    args = dict(num_requests=40, input_len=16, output_len=8, rate=None, trace_speedup=None,
                max_context=8192)  # fmt: skip
    return build_workload(name, **(args | kw))


def test_prefix_repetition_shares_each_prefix_among_its_requests_only():
    w = workload("prefix-repetition", num_requests=23, prefix_len=48, suffix_len=12,
                 num_prefixes=4, output_len=5, seed=3)  # fmt: skip
    reqs = w.requests
    assert len(reqs) == 20  # 23 // 4 = 5 per prefix; the rest dropped, as vLLM
    assert all((r.prompt_len, r.output_len) == (60, 5) for r in reqs)
    assert sorted(r.prefix for r in reqs) == [p for p in range(4) for _ in range(5)]
    assert [r.prefix for r in reqs] != sorted(r.prefix for r in reqs)  # shuffled, as vLLM
    assert w.describe()["prompts_per_prefix"] == 5 and "dropped" in w.info["note"]
    tok = build_tokenizer()
    prompts = build_prompts(w, tok, seed=3)
    assert [len(p) for p in prompts] == [60] * 20
    by_prefix = {}
    for r, p in zip(reqs, prompts):
        by_prefix.setdefault(r.prefix, []).append(p)
    heads = {p: {tuple(x[:48]) for x in group} for p, group in by_prefix.items()}
    assert all(len(h) == 1 for h in heads.values())  # one prefix per group, really shared
    assert len({h.pop() for h in heads.values()}) == 4  # and a different one per group
    suffixes = [tuple(p[48:]) for p in prompts]
    assert len(set(suffixes)) == 20  # every request's own suffix
    assert len(tok.decode(prompts[0][:48]).split()) > 5  # real text
    assert prompts == build_prompts(w, tok, seed=3)
    with pytest.raises(ConfigError, match="num-prefixes"):
        workload("prefix-repetition", num_requests=3, num_prefixes=4)
    with pytest.raises(ConfigError, match="exceed the context"):
        workload("prefix-repetition", prefix_len=8000, suffix_len=200)


def test_multi_turn_chains_trace_rows_whose_context_holds_the_history():
    rows = read_trace(trace_path("azure-conv"), limit=60)
    w = workload("multi-turn", num_requests=60, length_scale=0.5, think_time_s=2.0)
    reqs = w.requests
    assert len(reqs) == 60 and w.info["attribution"] == TRACE_ATTRIBUTION
    assert "CC-BY 4.0" in w.describe()["attribution"] and w.info["source"].endswith("conv.csv")
    for prev, r, row in zip((None, *reqs), reqs, rows):
        context, answer = scale_lengths(row.context_tokens, row.generated_tokens, 0.5)
        assert (r.prompt_len, r.output_len) == (context, answer)  # the trace's own lengths
        if r.is_follow_up:  # the row's context holds the whole previous turn and its answer
            assert r.conversation == prev.conversation and r.turn == prev.turn + 1
            assert r.prompt_len > prev.prompt_len + prev.output_len
            assert r.think_s == 2.0
        elif prev is not None:
            assert r.conversation == prev.conversation + 1 and r.turn == 0 and r.think_s == 0
            assert r.prompt_len <= prev.prompt_len + prev.output_len  # could not continue
    assert w.info["num_follow_ups"] == sum(r.is_follow_up for r in reqs) > 10
    assert w.info["num_conversations"] == 60 - w.info["num_follow_ups"]
    lens = message_lens(reqs)
    assert all(n >= 1 for n in lens)
    prompts = build_prompts(w, build_tokenizer())
    assert [len(p) for p in prompts] == lens  # a later turn's entry: its new message only
    poisson = workload("multi-turn", num_requests=60, rate=2.0)
    starts = {r.conversation: r.arrival_s for r in poisson.requests if not r.is_follow_up}
    assert len(set(starts.values())) == len(starts)  # one arrival per conversation
    assert all(r.arrival_s == starts[r.conversation] for r in poisson.requests)
    traced = workload("multi-turn", num_requests=60, trace_speedup=2.0)
    assert [r.arrival_s for r in traced.requests] == [row.time_s / 2 for row in rows]


def _record(req, token_ids, finish_s, error=None):
    rec = RequestRecord("x", req.request_id, req.arrival_s, req.prompt_len, req.output_len)
    rec.token_ids, rec.finish_s, rec.error = token_ids, finish_s, error
    rec.token_times_s = [finish_s] * len(token_ids)
    return rec


def test_a_turn_falls_due_after_the_answer_with_the_history_as_its_prompt():
    w = workload("multi-turn", num_requests=60, length_scale=0.05, think_time_s=1.5)
    reqs = list(w.requests)
    conv = next(r.conversation for r in reqs if r.turn == 2)
    turns = [r for r in reqs if r.conversation == conv]
    prompts = [[1000 + i] * n for i, n in enumerate(message_lens(reqs))]
    schedule = Schedule(turns, [prompts[r.request_id] for r in turns])
    [(first, ids)] = schedule.pop(1e9)
    assert first.request_id == turns[0].request_id and schedule.next_due_s() is None
    answer = list(range(first.output_len))
    assert schedule.finished(_record(first, answer, 7.0), ids) == []
    assert schedule.next_due_s() == 8.5  # the answer's end plus the think time
    assert schedule.pop(8.4) == []
    [(second, ids2)] = schedule.pop(8.5)
    assert second.arrival_s == 8.5  # latencies count from when the turn fell due
    assert ids2 == ids + answer + prompts[turns[1].request_id]  # prompt, answer, new message
    assert len(ids2) == turns[1].prompt_len
    # a turn that failed (or came back short) ends its conversation: the next turns fail
    dropped = schedule.finished(_record(second, answer[:1], 9.0), ids2)
    assert [d.request_id for d in dropped] == [t.request_id for t in turns[2:]]
    assert all("turn" in d.error and not d.ok for d in dropped) and not schedule


class FakePipe:
    """Streams ``token = position`` every millisecond until the request's max_new_tokens or
    its cancel; records what each request asked for."""

    batch_size = 4

    def __init__(self):
        self.asked, self.cancelled, self.prompts = [], [], []
        self._lock = threading.Lock()

    def submit(self, ids, params):
        handle = RequestHandle(len(self.asked), cancel=self._cancel)
        metrics = RequestMetrics(arrival_time=0.0)
        self.asked.append(params.max_new_tokens)
        self.prompts.append(list(ids))
        stop = threading.Event()
        handle._stop = stop

        def run():
            import time

            tokens = []
            while len(tokens) < params.max_new_tokens and not stop.wait(0.001):
                tokens.append(len(ids) + len(tokens))
                metrics.token_times.append(time.monotonic())
                handle._push(tokens[-1])
            metrics.finish_time = time.monotonic()
            reason = "abort" if stop.is_set() else "length"
            handle._finish(RequestOutput(handle.request_id, None, ids, tokens, "", reason,
                                         metrics))  # fmt: skip

        self._handles = getattr(self, "_handles", {})
        self._handles[handle.request_id] = handle
        threading.Thread(target=run, daemon=True).start()
        return handle

    def _cancel(self, request_id):
        self.cancelled.append(request_id)
        self._handles[request_id]._stop.set()

    def generate(self, prompts, params):
        return [self.submit(p, params).result() for p in prompts]


def test_the_client_asks_for_the_factor_and_takes_the_output_length():
    w = workload("fixed", num_requests=5, output_len=6, max_tokens_factor=16, max_context=100)
    assert [r.max_tokens for r in w.requests] == [84] * 5  # 16 x 6 = 96, capped to the context
    assert w.info["max_tokens_factor"] == 16
    assert workload("fixed", num_requests=2, output_len=6).requests[0].max_tokens is None
    with pytest.raises(ConfigError, match="max-tokens-factor"):
        workload("fixed", max_tokens_factor=0)
    prompts = [[1] * 16] * 5
    pipe = FakePipe()
    records, _ = replay_submit(pipe, list(w.requests), prompts, lambda n: None, "x")
    assert pipe.asked == [84] * 5 and sorted(pipe.cancelled) == list(range(5))
    for rec in records:  # exactly the workload's length, the request over at its last token
        assert rec.ok and rec.token_ids == list(range(16, 22)) and len(rec.token_times_s) == 6
        assert rec.finish_s == rec.token_times_s[-1]
    # generate() baselines reserve nothing: they ask for the length itself
    pipe = FakePipe()
    records, _ = replay_sequential(pipe, list(w.requests), prompts, lambda n: None, "x")
    assert pipe.asked == [6] * 5 and all(len(r.token_ids) == 6 for r in records)


def test_replay_sends_each_turn_with_the_answers_before_it():
    w = workload("multi-turn", num_requests=30, length_scale=0.02, think_time_s=0.0,
                 max_tokens_factor=3)  # fmt: skip
    reqs = list(w.requests)
    prompts = [[7] * n for n in message_lens(reqs)]
    pipe = FakePipe()
    records, _ = replay_submit(pipe, reqs, prompts, lambda n: None, "x")
    assert len(records) == 30 and all(r.ok for r in records)
    by_id = {r.request_id: r for r in records}
    sent = dict(zip((r.request_id for r in sorted(records, key=lambda r: r.submit_s)),
                    pipe.prompts))  # fmt: skip
    for prev, r in zip(reqs, reqs[1:]):
        assert len(sent[r.request_id]) == r.prompt_len
        if r.is_follow_up:  # previous prompt + its answer's tokens + the new message
            answer = by_id[prev.request_id].token_ids
            assert len(answer) == prev.output_len
            assert sent[r.request_id] == sent[prev.request_id] + answer + prompts[r.request_id]
            assert by_id[r.request_id].arrival_s >= by_id[prev.request_id].finish_s


def test_kv_cache_figures_from_counters_and_prometheus_text():
    before = {"prefix_cache_queries": 100, "prefix_cache_hits": 40, "num_preemptions": 1}
    after = {"prefix_cache_queries": 1100, "prefix_cache_hits": 790, "num_preemptions": 4}
    assert kv_cache_summary(before, after) == {
        "prefix_cache_queries": 1000, "prefix_cache_hits": 750, "prefix_cache_hit_rate": 0.75,
        "num_preemptions": 3,
    }  # fmt: skip
    assert kv_cache_summary({}, {})["prefix_cache_hit_rate"] is None  # not reported
    text = "\n".join([
        "# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of tokens.",
        "# TYPE vllm:prefix_cache_queries counter",
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 512.0',
        'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 256.0',
        'vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9',
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 384.0',
        "vllm:num_preemptions_total 2.0",
    ])  # fmt: skip
    assert prometheus_counters(text) == {
        "prefix_cache_queries": 768.0, "prefix_cache_hits": 384.0, "num_preemptions": 2.0,
    }  # fmt: skip
    assert prometheus_counters(None) == dict.fromkeys(
        ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions")
    )


def test_bench_and_sweep_tables_show_hit_rate_and_preemptions():
    from splitwiser.benchmark.report import comparison_table
    from splitwiser.benchmark.sweep_report import point_rows, sweep_table

    kv = {"prefix_cache_queries": 800, "prefix_cache_hits": 600, "prefix_cache_hit_rate": 0.75,
          "num_preemptions": 3, "kv_pool_tokens": 32768}  # fmt: skip
    metrics = {"completed": 4, "failed": 0, "output_throughput": 10.0, "kv_cache": kv}
    bench = {"systems": {"splitwiser": metrics, "vllm": {**metrics, "kv_cache": {}}},
             "ratios": {"vllm": {}}}  # fmt: skip
    table = comparison_table(bench)
    assert table.split("prefix cache hit %")[1].split()[:2] == ["75.0", "-"]
    assert "preemptions" in table and "32,768" in table
    point = {"rate": 1.0, "slo_attainment": 1.0, "failed": 0, "kv_cache": kv}
    sweep = {"systems": {"splitwiser": {"points": [point], "goodput_rps": 1.0,
                                        "highest_rate_met": True}},
             "slo": {"ttft_ms": 1.0}, "attainment_target": 0.9,
             "goodput_ratio_to_colocated": {}}  # fmt: skip
    [row] = point_rows(sweep)
    assert (row["prefix_cache_hit_rate"], row["num_preemptions"]) == (0.75, 3)
    lines = sweep_table(sweep).splitlines()
    assert "prefix hit  preempted" in lines[0] and lines[2].split()[-3:] == ["75%", "3", "-"]
