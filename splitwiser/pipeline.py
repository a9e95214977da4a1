"""``SplitwiserPipeline``: the public face of the phase-split runtime (prompt workers run the
prefill, token workers the decode, one device, one copy of the weights, one KV block pool)."""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from splitwiser.config import SPLIT_ONLY_OPTIONS, EngineConfig
from splitwiser.core.prompts import Prompt, submit_all
from splitwiser.errors import ConfigError
from splitwiser.handle import RequestHandle
from splitwiser.outputs import RequestOutput
from splitwiser.runtime.engine import Engine
from splitwiser.sampling import SamplingParams


class _EnginePipeline:
    """The public contract of a pipeline on the engine (``generate``, ``submit``, ``stats``,
    ``workers``, ``close``); subclasses say which workers it runs."""

    config: EngineConfig
    _engine: Engine

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self._engine.dtype

    @property
    def num_kv_blocks(self) -> int:
        return self._engine.num_kv_blocks

    def workers(self) -> dict[str, dict]:
        """Live workers: name -> pid and the memory figures of their ready message. A snapshot,
        safe from any thread while workers are replaced."""
        return self._engine.worker_info()

    def phase_log(self, since_s: float = 0.0) -> list:
        """Every prefill batch and decode step (``kind``, ``worker``, ``start_s``, ``end_s``,
        ``num_tokens``) that began at or after ``since_s`` (``time.monotonic()``), as the
        workers timed them, oldest first; at most the latest 65,536. What the interference
        figures of ``splitwiser sweep`` are computed from."""
        return self._engine.phase_log(since_s)

    def set_phase_slo(self, ttft_ms: float | None = None, tpot_ms: float | None = None) -> None:
        """The SLOs ``phase_control="slo"`` steers by, from now on (None: that phase has none);
        they start as ``ttft_slo_ms`` and ``tpot_slo_ms``. ``SplitwiserError`` under static
        control."""
        self._engine.set_phase_slo(ttft_ms, tpot_ms)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (benchmarks that must start cold). Returns False,
        and does nothing, while any request holds blocks (as vLLM's)."""
        return self._engine.reset_prefix_cache()

    def stats(self) -> dict:
        """A consistent snapshot, safe from any thread: KV blocks (``num_kv_blocks``,
        ``num_free_blocks`` counting cached-but-free blocks as free, ``num_cached_blocks``
        among them, ``num_used_blocks``), the prefix cache's ``prefix_cache_queries`` and
        ``prefix_cache_hits`` (prompt tokens since the start), ``num_preemptions``,
        ``num_unfinished`` (counted from ``submit()``), ``num_retried``,
        ``phases``, ``phase_control`` (``mode``; with "slo" its current ``level``,
        ``prefill_concurrency`` and ``max_prefill_tokens``, the SLOs, and every step it took
        in ``decisions``: time, level, what and why), and the pipeline's health: ``health``
        ("ok", "degraded" while a worker restarts, "failed" once a role crashed past the restart
        rate, "closed"), ``error``, and
        per role in ``workers`` the workers configured, ready, starting and vacant, with their
        restarts over the pipeline's life and within the restart window."""
        return self._engine.stats()

    def submit(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> RequestHandle:
        """Queue one request now (online use); wait on or stream the returned handle."""
        return self._engine.submit(prompt, sampling_params or SamplingParams())

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """Generate for every prompt (submitted at once), in the order given. If a prompt is
        rejected, or the wait is interrupted, the requests already submitted are cancelled."""
        return submit_all(self.submit, prompts, sampling_params)

    def close(self) -> None:
        """Stop every worker and release the pool and the weights this process maps. Safe to
        call twice; a pipeline still open at interpreter exit is closed then."""
        self._engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SplitwiserPipeline(_EnginePipeline):
    """Generate with prompt workers (prefill) and token workers (decode) sharing one device.

    ``model`` is a Hugging Face causal-LM directory, a hub id (offline from the local cache),
    ``"random:<preset>"``, or ``None`` for the embedded default. Other keyword arguments are the
    fields of :class:`splitwiser.config.EngineConfig`. A context manager; or call ``close()``.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        num_prompt_workers: int = 1,
        num_token_workers: int = 1,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        block_size: int = 16,
        **engine_options,
    ):
        self.config = EngineConfig(
            model=model,
            num_prompt_workers=num_prompt_workers,
            num_token_workers=num_token_workers,
            device=device,
            dtype=dtype,
            block_size=block_size,
            **engine_options,
        )
        self._engine = Engine(self.config)


class ColocatedPipeline(_EnginePipeline):
    """Generate with ONE worker process running both phases on Splitwiser's own data plane (the
    same model code, attention, sampler, block pool and CUDA graphs), scheduled as vLLM v1
    schedules: each step the running decodes first, then prefill chunks, first come first
    served, up to ``max_num_batched_tokens`` tokens and ``max_num_seqs`` requests (default
    128, vLLM's engine default and the decode slots of the default split, 2 token workers of
    64; at most a given ``max_num_batched_tokens``). The fair
    baseline for the split: the same kernels in one engine. Same contract and supervision as
    :class:`SplitwiserPipeline` (a killed worker's requests resume on its replacement)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        block_size: int = 16,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        **engine_options,
    ):
        for name in SPLIT_ONLY_OPTIONS:
            if name in engine_options:
                raise ConfigError(f"{name} is not an option of the colocated pipeline")
        config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            block_size=block_size,
            max_num_seqs=_colocated_max_num_seqs(max_num_seqs, max_num_batched_tokens),
            max_num_batched_tokens=max_num_batched_tokens,
            **engine_options,
        )
        self.config = replace(config, colocated=True)  # validated again, as colocated
        self._engine = Engine(self.config)


def _colocated_max_num_seqs(given: int | None, max_num_batched_tokens: int | None):
    """``given``, or 128 (at most the step budget when one is given: every running request
    decodes one token of it per step)."""
    if given is not None:
        return given
    if isinstance(max_num_batched_tokens, int) and max_num_batched_tokens > 0:
        return min(128, max_num_batched_tokens)
    return 128


def pipeline_from_config(config: EngineConfig) -> SplitwiserPipeline | ColocatedPipeline:
    """The pipeline ``config`` describes: the split, or (``colocated``) one worker running both
    phases with the same engine options."""
    options = {f.name: getattr(config, f.name) for f in fields(config)}
    if config.colocated:
        colocated = {k: v for k, v in options.items() if k not in SPLIT_ONLY_OPTIONS}
        return ColocatedPipeline(**colocated)
    return SplitwiserPipeline(**options)
