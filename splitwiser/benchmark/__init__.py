"""``splitwiser bench``: replay a workload through Splitwiser and the baselines in one run;
``splitwiser sweep``: the same at a range of offered loads, for each system's goodput."""

from splitwiser.benchmark.config import BenchConfig
from splitwiser.benchmark.driver import BenchResult, run_bench
from splitwiser.benchmark.sweep import SweepResult, run_sweep
from splitwiser.benchmark.sweep_config import SweepConfig

__all__ = ["BenchConfig", "BenchResult", "SweepConfig", "SweepResult", "run_bench", "run_sweep"]
