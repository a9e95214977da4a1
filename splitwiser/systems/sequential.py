"""``sequential``: Hugging Face ``generate()``, each request alone in arrival order (the papers'
baseline)."""

from __future__ import annotations

from splitwiser.systems.base import BenchSystem
from splitwiser.systems.replay import replay_sequential


class GenerateSystem(BenchSystem):
    """A baseline on ``generate()``: no pool, the K/V of ``generate()``'s own cache."""

    def facts(self, config, records, before) -> dict:
        return {"kv_bytes_per_token": self.pipe.shape.kv_bytes_per_token(self.pipe.dtype)}


class SequentialSystem(GenerateSystem):
    color = "tab:red"

    @classmethod
    def build(cls, spec, config, device, dtype, mps_pipe_dir) -> SequentialSystem:
        from splitwiser.baselines import SequentialPipeline

        return cls(spec, SequentialPipeline(config.engine.model, device=str(device), dtype=dtype))

    def replay(self, requests, prompts, progress):
        return replay_sequential(self.pipe, requests, prompts, progress, self.spec)
