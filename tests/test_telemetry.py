"""The bench's telemetry sampler: cheap readings at every sample, the costly ones (USS and PSS,
a walk of each process's page tables) only every ``memory_interval_s`` and at both ends."""

from __future__ import annotations

import time

import torch

from splitwiser.benchmark.telemetry import TelemetrySampler


def _run(seconds: float, **intervals):
    sampler = TelemetrySampler(torch.device("cpu"), **intervals)
    with sampler as log:
        time.sleep(seconds)
    return [row for row in log.samples if row["process"] == "driver"]


def test_uss_and_pss_are_read_at_both_ends_and_every_memory_interval_only():
    rows = _run(0.5, interval_s=0.02, memory_interval_s=60.0)
    assert len(rows) >= 10 and all(r["rss_mib"] > 0 for r in rows)
    full = [i for i, r in enumerate(rows) if r["uss_mib"] is not None]
    assert full == [0, len(rows) - 1]
    assert rows[0]["pss_mib"] is not None and rows[1]["pss_mib"] is None

    rows = _run(0.5, interval_s=0.02, memory_interval_s=0.1)
    full = sum(r["uss_mib"] is not None for r in rows)
    assert 4 <= full < len(rows) - 2  # about every fifth sample, never all of them


def test_the_summary_reads_pss_only_where_it_was_sampled():
    sampler = TelemetrySampler(torch.device("cpu"), interval_s=0.02, memory_interval_s=60.0)
    with sampler as log:
        time.sleep(0.2)
    summary = log.summary(output_tokens=1)
    driver = summary["processes"]["driver"]
    pss = [r["pss_mib"] for r in log.samples if r["pss_mib"] is not None]
    assert summary["max_total_pss_mib"] == max(pss) > 0
    assert driver["max_uss_mib"] > 0 and driver["max_rss_mib"] >= driver["max_uss_mib"]
