"""The vLLM systems (see ``splitwiser.vllm``): ``vllm``, plain vLLM; ``vllm-parallel``, as many
vLLM engines as Splitwiser's worker processes; ``vllm-split``, the phase split on vLLM with
NIXL (under MPS with the run's ``--mps-split``).

As users run vLLM: its automatic prefix caching on (vLLM's default; off only where the run turns
Splitwiser's off, ``--no-enable-prefix-caching``), emptied after the warm-up as Splitwiser's is,
and its stats logging on, whose metrics give the prefix cache's queries and hits and the
preemptions. The KV cache: where the run sizes Splitwiser's pool (``--kv-cache-tokens``, i.e.
``num_kv_blocks``, or ``kv_cache_bytes``) the vLLM engines together get the bytes of as many
tokens, else vLLM's bench default (1 GiB on CPU, as Splitwiser's; 90% of the GPU)."""

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
        engine = config.engine
        options = {
            "device": str(device), "dtype": dtype, "mps_pipe_dir": mps_pipe_dir,
            "enforce_eager": engine.enforce_eager,
            "enable_prefix_caching": engine.enable_prefix_caching is not False,
            "disable_log_stats": False,  # vLLM's metrics: prefix cache hits, preemptions
        }  # fmt: skip
        kv_bytes = engine.kv_cache_bytes
        if engine.num_kv_blocks is not None:  # the same pool in tokens as Splitwiser's
            from splitwiser.models.loader import load_model_config
            from splitwiser.models.shape import ModelShape

            shape = ModelShape.from_hf(load_model_config(engine.model))
            kv_bytes = engine.num_kv_blocks * engine.block_size * shape.kv_bytes_per_token(dtype)
        if kv_bytes is not None:
            options["kv_cache_bytes"] = kv_bytes
        return options

    @classmethod
    def pipeline(cls):
        from splitwiser.vllm import VLLMPipeline

        return VLLMPipeline

    @classmethod
    def build(cls, spec, config, device, dtype, mps_pipe_dir) -> VLLMSystem:
        options = cls.options(config, device, dtype, mps_pipe_dir)
        return cls(spec, cls.pipeline()(config.engine.model, **options))

    def cache_counters(self) -> dict:
        return self.pipe.kv_counters()

    def reset_prefix_cache(self) -> bool | None:
        return self.pipe.reset_prefix_cache()

    def kv_pool_tokens(self) -> int | None:
        return self.pipe.num_kv_tokens

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
