"""``splitwiser bench``: replay a workload through Splitwiser and the baselines in one run;
``splitwiser sweep``: the same at a range of offered loads, for each system's goodput.

The names below load on first use, so that the figures' modules (``metrics``, ``workloads``)
import without the drivers."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BenchConfig": "splitwiser.benchmark.config",
    "BenchResult": "splitwiser.benchmark.driver",
    "run_bench": "splitwiser.benchmark.driver",
    "SweepConfig": "splitwiser.benchmark.sweep_config",
    "SweepResult": "splitwiser.benchmark.sweep",
    "run_sweep": "splitwiser.benchmark.sweep",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = ["BenchConfig", "BenchResult", "SweepConfig", "SweepResult", "run_bench", "run_sweep"]
