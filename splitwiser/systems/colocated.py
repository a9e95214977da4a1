"""``colocated``: the fair baseline, ONE worker running both phases on Splitwiser's own data
plane with the run's engine options (and its ``max_num_batched_tokens``)."""

from __future__ import annotations

from dataclasses import replace

from splitwiser.systems.splitwiser import EngineSystem


class ColocatedSystem(EngineSystem):
    has_mixed_steps = True
    color = "tab:purple"

    @classmethod
    def build(cls, spec, config, device, dtype, mps_pipe_dir) -> ColocatedSystem:
        from splitwiser.pipeline import pipeline_from_config

        engine = config.engine
        # as many requests decoding at once as the split system's token workers together (each
        # decodes one token of the step budget)
        seqs = engine.max_num_seqs * engine.num_token_workers
        return cls(spec, pipeline_from_config(replace(
            engine, device=str(device), dtype=dtype, mps_pipe_dir=mps_pipe_dir,
            mps_thread_percentage=None, colocated=True, phase_control="static",
            max_num_seqs=min(seqs, engine.max_num_batched_tokens or seqs),
        )))  # fmt: skip
