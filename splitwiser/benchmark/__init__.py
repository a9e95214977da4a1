"""``splitwiser bench``: replay a workload through Splitwiser and the baselines in one run."""

from splitwiser.benchmark.config import BenchConfig
from splitwiser.benchmark.driver import BenchResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "run_bench"]
