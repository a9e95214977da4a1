"""The public pipelines: ``SplitwiserPipeline`` (phase-split workers) and ``SequentialPipeline``
(the papers' baseline: one process, each request alone through Hugging Face ``generate()``)."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from splitwiser.config import EngineConfig, resolve_device, resolve_dtype
from splitwiser.engine.engine import Engine
from splitwiser.engine.handle import RequestHandle
from splitwiser.models.loader import load_model
from splitwiser.outputs import RequestMetrics, RequestOutput
from splitwiser.prompts import PromptChecker, eos_token_ids, stop_reason
from splitwiser.sampling import SamplingParams

Prompt = str | list[int]


def _params_list(prompts: Sequence[Prompt], sampling_params) -> list[SamplingParams]:
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * len(prompts)
    if len(sampling_params) != len(prompts):
        raise ValueError("pass one SamplingParams, or one per prompt")
    return list(sampling_params)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


class SplitwiserPipeline:
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
        kv_handoff: str = "shared",
        block_size: int = 16,
        **engine_options,
    ):
        self.config = EngineConfig(
            model=model,
            num_prompt_workers=num_prompt_workers,
            num_token_workers=num_token_workers,
            device=device,
            dtype=dtype,
            kv_handoff=kv_handoff,
            block_size=block_size,
            **engine_options,
        )
        self._engine = Engine(self.config)

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
        """Live workers: name -> pid and the memory figures of their ready message."""
        return {w.name: vars(w.ready) for w in self._engine.workers.values() if w.ready is not None}

    def stats(self) -> dict:
        return self._engine.stats()

    def submit(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> RequestHandle:
        """Queue one request now (online use); wait on or stream the returned handle."""
        return self._engine.submit(prompt, sampling_params or SamplingParams())

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """Generate for every prompt (submitted at once), in the order given."""
        prompts = _as_prompt_list(prompts)
        params = _params_list(prompts, sampling_params)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        return [h.result() for h in handles]

    def close(self) -> None:
        """Stop every worker and release the pool. Safe to call twice."""
        self._engine.close()

    def __enter__(self) -> SplitwiserPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TokenTimes(BaseStreamer):
    """Records when ``generate()`` produced each token (its first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


class SequentialPipeline:
    """The baseline: one process, same model, device and dtype; each request alone, in order."""

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype=None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        loaded = load_model(model, dtype=self.dtype, device=self.device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.eos_token_ids = eos_token_ids(self.model)
        max_len = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.checker = PromptChecker(self.tokenizer, self.model.config.vocab_size, max_len)

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = _params_list(prompts, sampling_params)
        checked = [(self.checker.token_ids(p), sp) for p, sp in zip(prompts, params)]
        arrival = time.monotonic()
        return [
            self._one(i, p, ids, sp, arrival)
            for i, (p, (ids, sp)) in enumerate(zip(prompts, checked))
        ]

    @torch.inference_mode()
    def _one(self, request_id, prompt, ids, params: SamplingParams, arrival) -> RequestOutput:
        gen_config = copy.deepcopy(self.model.generation_config)
        if params.ignore_eos:
            # NOTE: not None: generate() refills None from the model's defaults
            gen_config.eos_token_id = []
        if params.stop_token_ids:
            gen_config.eos_token_id = list(params.stop_token_ids) + (
                [] if params.ignore_eos else list(self.eos_token_ids)
            )
        gen_config.max_new_tokens = self.checker.max_new_tokens(len(ids), params)
        gen_config.do_sample = not params.is_greedy
        kwargs = {}
        if not params.is_greedy:
            gen_config.temperature = params.temperature
            gen_config.top_p = params.top_p
            gen_config.top_k = params.top_k
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if params.stop:
            gen_config.stop_strings = list(params.stop)
            kwargs["tokenizer"] = self.tokenizer
        streamer = _TokenTimes()
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=gen_config,
            streamer=streamer,
            **kwargs,
        )
        finish = time.monotonic()
        tokens = out[0, len(ids) :].tolist()
        max_new = gen_config.max_new_tokens
        reason = (
            stop_reason(tokens[-1], len(tokens), max_new, params, self.eos_token_ids) or "length"
        )
        text, matched = self.checker.apply_stop_strings(tokens, params.stop or ())
        if matched:
            reason = "stop"
        return RequestOutput(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=ids,
            token_ids=tokens,
            text=text,
            finish_reason=reason,
            metrics=RequestMetrics(arrival, streamer.times, finish),
        )

    def close(self) -> None:
        pass

    def __enter__(self) -> SequentialPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
