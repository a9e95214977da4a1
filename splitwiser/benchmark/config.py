"""The configuration of one ``splitwiser bench`` run, validated before anything starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from splitwiser.benchmark.workloads import WORKLOADS
from splitwiser.config import KV_HANDOFF_MODES
from splitwiser.errors import ConfigError
from splitwiser.mps import MPS_MODES

BASELINES = ("sequential", "batched")  # the default comparison
VLLM_SYSTEMS = ("vllm", "vllm-parallel", "vllm-split")  # see splitwiser.vllm
MAX_REQUESTS = 1_000_000  # per system; the trace files hold fewer rows


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the Splitwiser system, the workload, and the baselines to compare."""

    model: str | None = None  # None: the embedded default model
    procs: int = 4  # worker processes sharing the device
    prompt_procs: int | None = None  # None: procs // 2 (the rest are token workers)
    mps: str = "auto"  # "on": required; "auto": used where available; "off"
    mps_split: tuple[int, int] | None = None  # (prompt, token) active thread percentages
    kv_handoff: str = "shared"
    model_impl: str = "auto"  # see EngineConfig.model_impl
    enforce_eager: bool = False  # CUDA: decode without CUDA graphs
    phase_priority: str = "prefill"  # CPU: see EngineConfig.phase_priority
    workload: str = "fixed"
    num_requests: int = 64
    input_len: int = 256  # fixed workload: prompt tokens
    output_len: int = 64  # fixed workload: output tokens
    rate: float | None = None  # Poisson arrivals, requests per second
    trace_speedup: float | None = None  # trace arrivals, time divided by this
    max_context: int | None = None  # cap on prompt + output tokens; None: the model's context
    length_scale: float = 1.0  # trace lengths multiplied by this before capping
    baselines: tuple[str, ...] = BASELINES
    batch_size: int = 20  # the batched baseline's static batch
    slo: dict[str, float] = field(default_factory=dict)  # e.g. {"ttft_ms": 500, "tpot_ms": 50}
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    num_warmup: int | None = None  # None: max(2, procs) requests, excluded from every system
    out: str = "results"
    run_id: str | None = None  # None: <date>-<time>-<workload>-<device>
    plots: bool = True

    def __post_init__(self) -> None:
        _positive_int("--procs", self.procs, 2)
        if self.prompt_procs is not None and not (
            isinstance(self.prompt_procs, int) and 1 <= self.prompt_procs < self.procs
        ):
            raise ConfigError(
                f"--prompt-procs must be between 1 and procs - 1 = {self.procs - 1} "
                f"(at least one token worker), got {self.prompt_procs!r}"
            )
        if self.mps not in MPS_MODES:
            raise ConfigError(f"--mps must be one of {', '.join(MPS_MODES)}, got {self.mps!r}")
        if self.mps_split is not None and self.mps == "off":
            raise ConfigError("--mps-split needs MPS; drop --no-mps or --mps-split")
        if self.kv_handoff not in KV_HANDOFF_MODES:
            raise ConfigError(f"--kv-handoff must be one of {', '.join(KV_HANDOFF_MODES)}")
        if self.workload not in WORKLOADS:
            raise ConfigError(
                f"unknown workload {self.workload!r}; choose one of: {', '.join(WORKLOADS)}"
            )
        for name in ("num_requests", "input_len", "output_len", "batch_size"):
            _positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.num_requests > MAX_REQUESTS:
            raise ConfigError(f"--num-requests must be at most {MAX_REQUESTS:,}")
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
        unknown = set(self.baselines) - set(BASELINES + VLLM_SYSTEMS)
        if unknown:
            raise ConfigError(
                f"unknown baseline {sorted(unknown)[0]!r}; use a comma list of "
                f"{', '.join(BASELINES + VLLM_SYSTEMS)}, or none"
            )
        if set(self.baselines) & set(VLLM_SYSTEMS):
            from splitwiser.vllm import require_vllm

            require_vllm()  # one line naming the install command, before any work

    @property
    def num_prompt_workers(self) -> int:
        """Half the processes run the prompt phase, rounded down; the rest decode."""
        return self.prompt_procs if self.prompt_procs is not None else self.procs // 2

    @property
    def num_token_workers(self) -> int:
        return self.procs - self.num_prompt_workers

    @property
    def warmup_requests(self) -> int:
        return self.num_warmup if self.num_warmup is not None else max(2, self.procs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_prompt_workers"] = self.num_prompt_workers
        d["num_token_workers"] = self.num_token_workers
        return d
