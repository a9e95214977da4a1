"""Benchmark metric definitions on hand-made timestamps (vLLM ``bench serve`` semantics)."""

from __future__ import annotations

import pytest

from splitwiser import ConfigError
from splitwiser.benchmark.metrics import (
    RequestRecord,
    compute_metrics,
    distribution,
    parse_slo,
    phase_summary,
    ratios,
)


def rec(arrival, token_times, prompt_len=10, error=None, request_id=0, **kw) -> RequestRecord:
    return RequestRecord(
        "s", request_id, arrival, prompt_len, len(token_times), arrival, list(token_times),
        token_times[-1] if token_times else None, error=error, **kw,
    )  # fmt: skip


def test_ttft_tpot_e2el_of_one_request():
    r = rec(1.0, [1.1, 1.15, 1.25, 1.5])
    assert r.ttft_s == pytest.approx(0.1)
    assert r.e2el_s == pytest.approx(0.5)
    # (E2E - TTFT) / (n - 1), not the mean of whatever gaps happened to be recorded
    assert r.tpot_s == pytest.approx((0.5 - 0.1) / 3)
    assert r.itl_s == pytest.approx([0.05, 0.1, 0.25])


def test_single_token_request_has_no_tpot_and_latency_counts_from_arrival():
    r = rec(2.0, [2.3])
    assert r.tpot_s is None and r.itl_s == []
    assert r.ttft_s == pytest.approx(0.3) and r.e2el_s == pytest.approx(0.3)


def test_itl_is_pooled_over_requests_not_averaged_per_request():
    a = rec(0.0, [0.0, 0.01, 0.02, 0.03])  # three gaps of 10 ms
    b = rec(0.0, [0.0, 0.1], request_id=1)  # one gap of 100 ms
    m = compute_metrics([a, b], duration_s=1.0)
    assert m["mean_itl_ms"] == pytest.approx((10 + 10 + 10 + 100) / 4)  # not (10 + 100) / 2
    assert m["median_itl_ms"] == pytest.approx(10)
    assert m["mean_tpot_ms"] == pytest.approx((10 + 100) / 2)  # TPOT is per request


def test_percentiles_interpolate_linearly():
    d = distribution("x_ms", [float(v) for v in range(1, 101)])
    assert d["median_x_ms"] == pytest.approx(50.5)
    assert d["p90_x_ms"] == pytest.approx(90.1)
    assert d["p99_x_ms"] == pytest.approx(99.01)
    assert d["mean_x_ms"] == pytest.approx(50.5)
    assert distribution("x_ms", [])["p99_x_ms"] is None


def test_throughputs_failures_and_goodput():
    good = rec(0.0, [0.1, 0.2, 0.3], prompt_len=7)  # ttft 100 ms, tpot 100 ms
    slow = rec(0.0, [0.9, 0.95], prompt_len=5, request_id=1)  # ttft 900 ms, tpot 50 ms
    failed = rec(0.0, [], request_id=2, error="WorkerCrashedError: boom")
    m = compute_metrics([good, slow, failed], 2.0, slo={"ttft_ms": 500, "tpot_ms": 150})
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_output_tokens"] == 5 and m["total_input_tokens"] == 12
    assert m["output_throughput"] == pytest.approx(5 / 2.0)
    assert m["request_throughput"] == pytest.approx(2 / 2.0)
    assert m["total_token_throughput"] == pytest.approx(17 / 2.0)
    assert m["request_goodput"] == pytest.approx(1 / 2.0)  # only `good` meets both SLOs
    strict = compute_metrics([good, slow], 2.0, slo={"tpot_ms": 60})
    assert strict["request_goodput"] == pytest.approx(1 / 2.0)  # only `slow` meets it
    assert "request_goodput" not in compute_metrics([good], 1.0)


def test_handoff_figures_only_where_recorded():
    a = rec(0.0, [0.1, 0.2], handoff_s=0.001, kv_bytes_copied=100)
    b = rec(0.0, [0.1, 0.2], request_id=1, handoff_s=0.003, kv_bytes_copied=50)
    m = compute_metrics([a, b], 1.0)
    assert m["median_handoff_ms"] == pytest.approx(2.0)
    assert m["kv_bytes_copied"] == 150
    assert "median_handoff_ms" not in compute_metrics([rec(0.0, [0.1])], 1.0)


def test_parse_slo():
    assert parse_slo("ttft_ms=500, tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_slo(None) == {}
    for bad in ("ttft=500", "ttft_ms", "ttft_ms=fast", "e2el_ms=-1"):
        with pytest.raises(ConfigError):
            parse_slo(bad)


def test_ratios_divide_splitwiser_by_each_baseline():
    systems = {
        "splitwiser": {"output_throughput": 300.0, "median_ttft_ms": 20.0},
        "sequential": {"output_throughput": 100.0, "median_ttft_ms": 80.0},
        "batched": {"output_throughput": 150.0, "median_ttft_ms": None},
    }
    r = ratios(systems)
    assert r["sequential"] == {"output_throughput": 3.0, "median_ttft_ms": 0.25}
    assert r["batched"] == {"output_throughput": 2.0}


def test_phase_summary_rates_and_empty_phases():
    counters = dict(prefill_tokens=1000, prefill_s=0.5, prefill_batches=4, decode_tokens=90,
                    decode_s=0.3, decode_steps=30)  # fmt: skip
    summary = phase_summary(counters)
    assert summary["prefill_tokens_per_s"] == pytest.approx(2000)
    assert summary["mean_prefill_batch_tokens"] == 250
    assert summary["mean_decode_step_ms"] == pytest.approx(10)
    assert summary["mean_decode_batch"] == 3
    assert summary["decode_tokens"] == 90  # the counters themselves kept
    idle = phase_summary(dict.fromkeys(counters, 0))  # a run with no decode step: no rates
    assert all(idle[k] is None for k in ("prefill_tokens_per_s", "mean_decode_step_ms"))
