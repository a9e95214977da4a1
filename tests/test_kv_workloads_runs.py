"""The new workloads through real systems on the embedded model: every system's tokens equal
the reference's, each request takes exactly its output length, and the summary carries the
prefix cache's figures."""

from __future__ import annotations

import csv

from splitwiser.benchmark import BenchConfig, run_bench
from splitwiser.benchmark.report import comparison_table
from splitwiser.config import EngineConfig

ENGINE = EngineConfig(num_prompt_workers=1, num_token_workers=1, num_kv_blocks=64)


def _rows(run_dir) -> list[dict]:
    with open(run_dir / "requests.csv") as f:
        return list(csv.DictReader(f))


def test_prefix_repetition_asking_for_more_tokens_matches_generate(tmp_path, leftovers):
    config = BenchConfig(
        engine=ENGINE, workload="prefix-repetition", num_requests=8, output_len=4, rate=10.0,
        prefix_repetition_prefix_len=64, prefix_repetition_suffix_len=16,
        prefix_repetition_num_prefixes=2, max_tokens_factor=4, baselines=("sequential",),
        num_warmup=1, out=str(tmp_path), run_id="p", plots=False,
    )  # fmt: skip
    result = run_bench(config, show=False)
    summary = result.summary
    # greedy float32: cached prefixes or not, cut by the client or not, generate()'s tokens
    assert summary["token_agreement_with_sequential"] == {"splitwiser": 1.0}
    for name, system in summary["systems"].items():
        assert (system["completed"], system["failed"]) == (8, 0), name
        assert system["total_output_tokens"] == 32  # 4 each, though splitwiser's asked for 16
    assert all(int(r["num_output_tokens"]) == 4 and not r["error"] for r in _rows(result.run_dir))
    kv = summary["systems"]["splitwiser"]["kv_cache"]
    assert kv["kv_pool_tokens"] == 64 * 16 and kv["prefix_cache_reset"] is not False
    assert kv["prefix_cache_queries"] == 8 * 80  # every prompt token looked up, once
    # the prefixes' blocks, computed by the first request of each, found by the later ones
    assert 0 < kv["prefix_cache_hits"] <= 6 * 64 and kv["prefix_cache_hits"] % 16 == 0
    assert kv["num_preemptions"] == 0
    assert "prefix cache hit %" in comparison_table(summary)
    assert summary["workload"]["max_tokens_factor"] == 4
    leftovers.assert_clean()


def test_multi_turn_turns_carry_their_history_in_every_system(tmp_path, leftovers):
    config = BenchConfig(
        engine=ENGINE, workload="multi-turn", num_requests=10, length_scale=0.03,
        think_time_s=0.0, max_context=200, baselines=("sequential",), num_warmup=1,
        out=str(tmp_path), run_id="m", plots=False,
    )  # fmt: skip
    result = run_bench(config, show=False)
    summary = result.summary
    assert summary["workload"]["num_follow_ups"] >= 3
    # greedy float32: the split's answers equal generate()'s, so the histories do too
    assert summary["token_agreement_with_sequential"] == {"splitwiser": 1.0}
    requests = {r.request_id: r for r in result.runs["splitwiser"].records}
    for name, run in result.runs.items():
        assert len(run.records) == 10 and all(r.ok for r in run.records), name
        for r in run.records:
            assert len(r.token_ids) == r.output_len
    # a later turn is sent once the answer before it arrived (think time 0), in each system
    later = sorted(r.request_id for r in result.runs["sequential"].records if r.arrival_s > 0)
    assert later == sorted(r.request_id for r in requests.values() if r.arrival_s > 0) != []
    leftovers.assert_clean()
