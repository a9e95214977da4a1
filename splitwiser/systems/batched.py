"""``batched``: Hugging Face ``generate()`` on static batches of up to ``--batch-size``
requests."""

from __future__ import annotations

from splitwiser.systems.replay import replay_batched
from splitwiser.systems.sequential import GenerateSystem


class BatchedSystem(GenerateSystem):
    color = "tab:orange"

    @classmethod
    def build(cls, spec, config, device, dtype, mps_pipe_dir) -> BatchedSystem:
        from splitwiser.baselines import BatchedPipeline

        pipe = BatchedPipeline(
            config.engine.model, device=str(device), dtype=dtype, batch_size=config.batch_size
        )
        return cls(spec, pipe)

    def replay(self, requests, prompts, progress):
        return replay_batched(self.pipe, requests, prompts, progress, self.spec)
