"""Workloads: the shipped Azure traces, length capping and scaling, arrivals, exact prompts."""

from __future__ import annotations

import random
import shutil

import pytest

from splitwiser import ConfigError
from splitwiser.benchmark.workloads import (
    build_prompts,
    build_workload,
    cap_lengths,
    poisson_arrivals,
    read_trace,
    trace_path,
)
from splitwiser.models.default import build_tokenizer


def workload(name="azure-conv", **kw):
    args = dict(num_requests=50, input_len=16, output_len=4, rate=None, trace_speedup=None,
                max_context=8192)  # fmt: skip
    return build_workload(name, **(args | kw))


def test_shipped_traces_read_whole_and_in_order():
    code = read_trace(trace_path("azure-code"))
    conv = read_trace(trace_path("azure-conv"))
    assert (len(code), len(conv)) == (8819, 19366)
    # first data row of the conversation trace: 2023-11-16 18:15:46.6805900,374,44
    assert (conv[0].time_s, conv[0].context_tokens, conv[0].generated_tokens) == (0.0, 374, 44)
    assert conv[1].time_s == pytest.approx(4.3145791, abs=1e-6)  # 18:15:50.9951690
    times = [r.time_s for r in conv]
    assert times == sorted(times)
    assert times[-1] == pytest.approx(3501.7, abs=0.1)  # the trace spans about an hour
    assert len(read_trace(trace_path("azure-code"), limit=5)) == 5


def test_trace_dir_override_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITWISER_TRACE_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="SPLITWISER_TRACE_DIR"):
        trace_path("azure-code")
    monkeypatch.delenv("SPLITWISER_TRACE_DIR")
    shutil.copy(trace_path("azure-code"), tmp_path / "AzureLLMInferenceTrace_code.csv")
    monkeypatch.setenv("SPLITWISER_TRACE_DIR", str(tmp_path))
    assert trace_path("azure-code").parent == tmp_path
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="missing columns"):
        read_trace(tmp_path / "bad.csv")


def test_cap_lengths_scales_then_fits_the_context():
    assert cap_lengths(1000, 100, 8192) == (1000, 100)
    assert cap_lengths(1000, 100, 8192, length_scale=0.1) == (100, 10)
    assert cap_lengths(3, 2, 8192, length_scale=0.01) == (1, 1)  # never below one token
    assert cap_lengths(7000, 300, 2048) == (1748, 300)  # prompt takes what the output leaves
    assert cap_lengths(100, 5000, 2048) == (100, 1024)  # output keeps at most half
    for ctx, gen in ((14050, 1000), (2, 7), (5000, 5000)):
        p, o = cap_lengths(ctx, gen, 512)
        assert p >= 1 and o >= 1 and p + o <= 512


def test_trace_workload_arrivals_lengths_and_caps():
    rows = read_trace(trace_path("azure-conv"), limit=50)
    w = workload(trace_speedup=4.0, max_context=512, length_scale=0.5)
    assert w.arrival == "trace" and len(w.requests) == 50
    for row, req in zip(rows, w.requests):
        assert req.arrival_s == pytest.approx(row.time_s / 4.0)
        assert (req.prompt_len, req.output_len) == cap_lengths(
            row.context_tokens, row.generated_tokens, 512, 0.5
        )
        assert req.prompt_len + req.output_len <= 512
    info = w.describe()
    assert info["num_capped"] > 0 and info["length_scale"] == 0.5
    assert "CC-BY 4.0" in info["attribution"] and info["source"].endswith("conv.csv")


def test_arrival_modes():
    assert {r.arrival_s for r in workload().requests} == {0.0}  # neither: all at once
    p = workload(rate=5.0, seed=7)
    assert p.arrival == "poisson"
    assert [r.arrival_s for r in p.requests] == [
        r.arrival_s for r in workload(rate=5.0, seed=7).requests
    ]
    times = poisson_arrivals(4000, 5.0, random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and sum(gaps) / len(gaps) == pytest.approx(0.2, rel=0.06)


def test_fixed_workload_and_its_errors():
    w = workload("fixed", num_requests=3, input_len=100, output_len=20, rate=2.0)
    assert [(r.prompt_len, r.output_len) for r in w.requests] == [(100, 20)] * 3
    with pytest.raises(ConfigError, match="trace workload"):
        workload("fixed", trace_speedup=2.0)
    with pytest.raises(ConfigError, match="exceeds the context"):
        workload("fixed", input_len=8000, output_len=500)
    with pytest.raises(ConfigError, match="unknown workload"):
        workload("sharegpt")


def test_prompts_have_the_exact_length_in_the_models_tokens():
    tok = build_tokenizer()
    w = workload(max_context=4096, num_requests=20)
    prompts = build_prompts(w, tok, seed=0)
    assert [len(p) for p in prompts] == [r.prompt_len for r in w.requests]
    assert all(0 <= t < len(tok) for p in prompts for t in p)
    assert prompts == build_prompts(w, tok, seed=0)  # same seed, same prompts
    assert len({tuple(p[:8]) for p in prompts}) > 10  # different windows of the corpus
    text = tok.decode(prompts[0][:50])
    assert len(text.split()) > 5  # real text, not random ids
