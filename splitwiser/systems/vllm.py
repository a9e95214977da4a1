"""The vLLM systems (see ``splitwiser.vllm``): ``vllm``, plain vLLM; ``vllm-parallel``, as many
vLLM engines as Splitwiser's worker processes; ``vllm-split``, the phase split on vLLM with
NIXL (under MPS with the run's ``--mps-split``)."""

from __future__ import annotations

from splitwiser.systems.base import BenchSystem


class VLLMSystem(BenchSystem):
    color = "tab:green"

    @classmethod
    def check(cls, spec, config) -> None:
        from splitwiser.vllm import require_vllm

        require_vllm()  # one line naming the install command, before any work

    @classmethod
    def options(cls, config, device, dtype, mps_pipe_dir) -> dict:
        """The keyword arguments of the vLLM pipeline."""
        return {"device": str(device), "dtype": dtype, "mps_pipe_dir": mps_pipe_dir,
                "enforce_eager": config.engine.enforce_eager}  # fmt: skip

    @classmethod
    def pipeline(cls):
        from splitwiser.vllm import VLLMPipeline

        return VLLMPipeline

    @classmethod
    def build(cls, spec, config, device, dtype, mps_pipe_dir) -> VLLMSystem:
        options = cls.options(config, device, dtype, mps_pipe_dir)
        return cls(spec, cls.pipeline()(config.engine.model, **options))

    def facts(self, config, records, before) -> dict:
        return {"engines": self.pipe.workers(), "stats": self.pipe.stats()}


class VLLMParallelSystem(VLLMSystem):
    color = "tab:olive"

    @classmethod
    def options(cls, config, device, dtype, mps_pipe_dir) -> dict:
        # as many processes as Splitwiser's
        return super().options(config, device, dtype, mps_pipe_dir) | {"num_engines": config.procs}

    @classmethod
    def pipeline(cls):
        from splitwiser.vllm import VLLMParallelPipeline

        return VLLMParallelPipeline


class VLLMSplitSystem(VLLMSystem):
    color = "tab:cyan"

    @classmethod
    def options(cls, config, device, dtype, mps_pipe_dir) -> dict:
        options = super().options(config, device, dtype, mps_pipe_dir)
        if mps_pipe_dir:
            options["mps_thread_percentage"] = config.mps_split
        return options

    @classmethod
    def pipeline(cls):
        from splitwiser.vllm import VLLMSplitPipeline

        return VLLMSplitPipeline
