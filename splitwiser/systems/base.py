"""The protocol every bench system implements: what ``splitwiser bench`` and ``splitwiser sweep``
ask of a system in its own process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from splitwiser.systems.replay import Progress, replay_submit

# the KV cache's cumulative counters a system reports (stats() keys and vLLM's metric names):
# prompt tokens looked up in the prefix cache and found there, and requests preempted
CACHE_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions")

if TYPE_CHECKING:
    import torch

    from splitwiser.benchmark.config import BenchConfig
    from splitwiser.benchmark.metrics import RequestRecord
    from splitwiser.benchmark.workloads import BenchRequest


class BenchSystem:
    """One system of a run, built in the system's process around the object that serves the
    requests (``self.pipe``: a pipeline, a vLLM engine pool, an HTTP client).

    A subclass sets ``build`` and, where it differs from the default, the replay and the facts
    it reports. ``spec`` is the system as given (``"vllm-split"``, ``"http://host:8000/v1"``)."""

    # on Splitwiser's engine: phase counters and a phase log (``phase_counters``, ``phase_log``)
    is_engine: ClassVar[bool] = False
    # the phase log has mixed steps (prefill chunks beside decodes in one step)
    has_mixed_steps: ClassVar[bool] = False
    color: ClassVar[str | None] = None  # in the plots

    def __init__(self, spec: str, pipe: Any):
        self.spec = spec
        self.pipe = pipe

    @classmethod
    def check(cls, spec: str, config: BenchConfig) -> None:
        """Before any work: raise ``ConfigError`` where this system cannot run at all."""

    @classmethod
    def build(
        cls, spec: str, config: BenchConfig, device: torch.device, dtype: torch.dtype,
        mps_pipe_dir: str | None,
    ) -> BenchSystem:  # fmt: skip
        """The system on the resolved device and dtype; ``mps_pipe_dir``: the MPS daemon's, or
        None without MPS."""
        raise NotImplementedError

    def replay(
        self, requests: list[BenchRequest], prompts: list[list[int]], progress: Progress
    ) -> tuple[list[RequestRecord], float]:
        """Run ``requests`` at their arrival times; the records and the run's duration."""
        return replay_submit(self.pipe, requests, prompts, progress, self.spec)

    def phase_counters(self) -> dict:
        """The engine's phase counters now ({} for a system not on the engine)."""
        return {}

    def phase_log(self, since: float) -> list | None:
        """The engine's steps since ``since`` (``time.monotonic()``); None: not an engine."""
        return None

    def cache_counters(self) -> dict[str, float | None]:
        """``CACHE_COUNTERS`` now, cumulative ({} or None values: not reported)."""
        return {}

    def reset_prefix_cache(self) -> bool | None:
        """Empty the prefix cache, before a measured run (the warm-up's prompts cached in one
        system and not another would skew the comparison); True if it was emptied, None for a
        system without one."""
        return None

    def set_phase_slo(self, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        """Give phase control its SLOs; False: this system has none."""
        return False

    def phase_control(self) -> dict | None:
        """The phase control's state and decisions (``stats()["phase_control"]``); None: none."""
        return None

    def kv_pool_tokens(self) -> int | None:
        """Tokens the KV pool holds (all engines together); None: not known."""
        return None

    def facts(self, config: BenchConfig, records: list[RequestRecord], before: dict) -> dict:
        """What the system reports besides the request metrics; ``before``: its phase counters
        when the measured run began."""
        return {}

    def close(self) -> None:
        self.pipe.close()

    def __enter__(self) -> BenchSystem:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
