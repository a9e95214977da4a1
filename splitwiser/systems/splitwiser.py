"""``splitwiser``: the split itself, prompt and token workers on Splitwiser's engine, with the
run's engine options (and, under MPS, its ``--mps-split``)."""

from __future__ import annotations

from dataclasses import replace

from splitwiser.benchmark.metrics import phase_summary
from splitwiser.systems.base import CACHE_COUNTERS, BenchSystem


class EngineSystem(BenchSystem):
    """A system on Splitwiser's engine: it reports phases, a phase log, its pool and workers."""

    is_engine = True

    def phase_counters(self) -> dict:
        return dict(self.pipe.stats()["phases"])

    def phase_log(self, since: float) -> list:
        return self.pipe.phase_log(since)

    def cache_counters(self) -> dict:
        stats = self.pipe.stats()
        return {key: stats.get(key) for key in CACHE_COUNTERS}

    def reset_prefix_cache(self) -> bool | None:
        reset = getattr(self.pipe, "reset_prefix_cache", None)
        return None if reset is None else reset()

    def set_phase_slo(self, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        """Give phase control its SLOs; False where the system has none (static control)."""
        if self.pipe.config.phase_control != "slo":
            return False
        self.pipe.set_phase_slo(ttft_ms, tpot_ms)
        return True

    def phase_control(self) -> dict:
        return self.pipe.stats()["phase_control"]

    def kv_pool_tokens(self) -> int | None:
        return self.pipe.num_kv_blocks * self.pipe.config.block_size

    def facts(self, config, records, before) -> dict:
        stats = self.pipe.stats()
        return {
            "num_kv_blocks": stats["num_kv_blocks"],
            "kv_bytes_per_token": stats["kv_bytes_per_token"],
            # prefill, decode (and colocated: mixed) steps as the workers timed them, measured run
            "phases": phase_summary({k: v - before[k] for k, v in stats["phases"].items()}),
            "workers": self.pipe.workers(),
            "stats": stats,
        }


class SplitwiserSystem(EngineSystem):
    color = "tab:blue"

    @classmethod
    def build(cls, spec, config, device, dtype, mps_pipe_dir) -> SplitwiserSystem:
        from splitwiser.pipeline import pipeline_from_config

        engine = replace(
            config.engine, device=str(device), dtype=dtype, mps_pipe_dir=mps_pipe_dir,
            mps_thread_percentage=config.mps_split if mps_pipe_dir else None,
        )  # fmt: skip
        return cls(spec, pipeline_from_config(engine))

    def facts(self, config, records, before) -> dict:
        facts = super().facts(config, records, before)
        done = [r for r in records if r.ok]
        moved_nothing = config.engine.kv_handoff == "shared"
        # the prompt K/V that stayed in the shared pool instead of travelling to a token worker
        facts["kv_bytes_not_moved"] = (
            sum(r.prompt_len for r in done) * facts["kv_bytes_per_token"] if moved_nothing else 0
        )
        return facts
