"""The configuration of one ``splitwiser bench`` run, validated before anything starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from splitwiser.benchmark.workloads import WORKLOADS
from splitwiser.config import EngineConfig
from splitwiser.errors import ConfigError
from splitwiser.mps import MPS_MODES
from splitwiser.systems import BASELINES, get_system

MAX_REQUESTS = 1_000_000  # per system; the trace files hold fewer rows
DEFAULT_PROCS = 4  # worker processes sharing the device


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def split_procs(procs: int, prompt_procs: int | None = None) -> dict[str, int]:
    """``num_prompt_workers`` and ``num_token_workers`` of ``procs`` worker processes:
    ``prompt_procs`` of them run the prompt phase (default: half, rounded down), the rest decode."""
    _positive_int("--procs", procs, 2)
    num_prompt = procs // 2 if prompt_procs is None else prompt_procs
    if not (isinstance(num_prompt, int) and 1 <= num_prompt < procs):
        raise ConfigError(
            f"--prompt-procs must be between 1 and procs - 1 = {procs - 1} "
            f"(at least one token worker), got {prompt_procs!r}"
        )
    return {"num_prompt_workers": num_prompt, "num_token_workers": procs - num_prompt}


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the Splitwiser system, the workload, and the baselines to compare."""

    # the Splitwiser system; its model, device and dtype are every system's, and the colocated
    # baseline runs its options too (and its max_num_batched_tokens). Each system's process
    # sets the resolved device and dtype, and the MPS daemon, with dataclasses.replace
    engine: EngineConfig = EngineConfig(**split_procs(DEFAULT_PROCS))
    mps: str = "auto"  # "on": required; "auto": used where available; "off"
    mps_split: tuple[int, int] | None = None  # (prompt, token) active thread percentages
    workload: str = "fixed"
    num_requests: int = 64
    input_len: int = 256  # fixed workload: prompt tokens
    output_len: int = 64  # fixed workload: output tokens
    rate: float | None = None  # Poisson arrivals, requests per second
    trace_speedup: float | None = None  # trace arrivals, time divided by this
    max_context: int | None = None  # cap on prompt + output tokens; None: the model's context
    length_scale: float = 1.0  # trace lengths multiplied by this before capping
    # every request asks for this many times its output length (max_tokens, capped to the
    # context) and the client cancels it once it has its output length, as a chat client
    max_tokens_factor: int = 1
    # prefix-repetition (vLLM's --prefix-repetition-*; the output length is output_len)
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    think_time_s: float = 1.0  # multi-turn: from an answer to the next turn
    baselines: tuple[str, ...] = BASELINES
    batch_size: int = 20  # the batched baseline's static batch
    slo: dict[str, float] = field(default_factory=dict)  # e.g. {"ttft_ms": 500, "tpot_ms": 50}
    seed: int = 0
    num_warmup: int | None = None  # None: max(2, procs) requests, excluded from every system
    out: str = "results"
    run_id: str | None = None  # None: <date>-<time>-<workload>-<device>
    plots: bool = True

    def __post_init__(self) -> None:
        if self.mps not in MPS_MODES:
            raise ConfigError(f"--mps must be one of {', '.join(MPS_MODES)}, got {self.mps!r}")
        if self.mps_split is not None and self.mps == "off":
            raise ConfigError("--mps-split needs MPS; drop --no-mps or --mps-split")
        if self.workload not in WORKLOADS:
            raise ConfigError(
                f"unknown workload {self.workload!r}; choose one of: {', '.join(WORKLOADS)}"
            )
        for name in ("num_requests", "input_len", "output_len", "batch_size",
                     "max_tokens_factor", "prefix_repetition_suffix_len",
                     "prefix_repetition_num_prefixes"):  # fmt: skip
            _positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.num_requests > MAX_REQUESTS:
            raise ConfigError(f"--num-requests must be at most {MAX_REQUESTS:,}")
        _positive_int("--prefix-repetition-prefix-len", self.prefix_repetition_prefix_len, 0)
        if not (0 <= self.think_time_s < math.inf):
            raise ConfigError(f"--think-time must be >= 0 seconds, got {self.think_time_s}")
        if self.num_warmup is not None:
            _positive_int("--num-warmup", self.num_warmup, 0)
        if self.max_context is not None:
            _positive_int("--max-context", self.max_context, 2)
        if self.rate is not None and self.trace_speedup is not None:
            raise ConfigError("give --rate (Poisson arrivals) or --trace-speedup, not both")
        for name in ("rate", "trace_speedup", "length_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be finite, got {value}")
        systems = {spec: get_system(spec) for spec in sorted(self.baselines)}
        for spec, system in systems.items():
            system.check(spec, self)

    def workload_options(self) -> dict:
        """``build_workload``'s keywords for this run's workload, but arrivals and context."""
        return {
            "num_requests": self.num_requests, "input_len": self.input_len,
            "output_len": self.output_len, "length_scale": self.length_scale,
            "seed": self.seed, "max_tokens_factor": self.max_tokens_factor,
            "prefix_len": self.prefix_repetition_prefix_len,
            "suffix_len": self.prefix_repetition_suffix_len,
            "num_prefixes": self.prefix_repetition_num_prefixes,
            "think_time_s": self.think_time_s,
        }  # fmt: skip

    @property
    def procs(self) -> int:
        """Splitwiser's worker processes (the vLLM data-parallel system runs as many)."""
        return self.engine.num_workers

    @property
    def warmup_requests(self) -> int:
        return self.num_warmup if self.num_warmup is not None else max(2, self.procs)

    def to_dict(self) -> dict:
        """Flat, as ``summary.json`` records it: the engine's fields next to the run's own."""
        d = asdict(self)
        return {**d.pop("engine"), "procs": self.procs, **d}
