"""The baselines Splitwiser is measured against, both plain Hugging Face ``generate()`` in one
process on the same model, device and dtype:

- ``SequentialPipeline``: each request alone, in order (the papers' baseline);
- ``BatchedPipeline``: static batches, left-padded, each run until its longest request finishes.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers.generation.streamers import BaseStreamer

from splitwiser.config import resolve_device, resolve_dtype
from splitwiser.core.prompts import (
    PromptChecker,
    as_prompt_list,
    eos_token_ids,
    params_list,
    stop_reason,
)
from splitwiser.errors import ConfigError, InvalidRequestError
from splitwiser.models.loader import load_model
from splitwiser.models.shape import ModelShape
from splitwiser.outputs import RequestMetrics, RequestOutput
from splitwiser.sampling import SamplingParams


class _StepTimes(BaseStreamer):
    """Records when ``generate()`` finished each decoding step (its first ``put`` is the prompt)."""

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


class _GenerateBaseline:
    """Model loading, prompt checks and ``generate()`` configuration shared by the baselines."""

    def __init__(self, model: str | None, device, dtype):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        loaded = load_model(model, dtype=self.dtype, device=self.device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.eos_token_ids = eos_token_ids(self.model)
        # pad_token_id may legitimately be 0, so no `or` chains
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.model.config.pad_token_id
        if pad is None:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = pad
        # the context Splitwiser serves (sliding window applied): both reject the same requests
        self.shape = ModelShape.from_hf(self.model.config)
        self.checker = PromptChecker(
            self.tokenizer, self.shape.vocab_size, self.shape.max_model_len()
        )

    def _generation_config(self, params: SamplingParams, max_new_tokens: int):
        gen_config = copy.deepcopy(self.model.generation_config)
        if params.ignore_eos:
            # NOTE: not None: generate() refills None from the model's defaults
            gen_config.eos_token_id = []
        if params.stop_token_ids:
            gen_config.eos_token_id = list(params.stop_token_ids) + (
                [] if params.ignore_eos else list(self.eos_token_ids)
            )
        # NOTE: always set: transformers 5.17 takes the pad token from eos_token_id[0] when it is
        # missing, which fails when ignore_eos emptied that list
        gen_config.pad_token_id = self.pad_token_id
        gen_config.max_new_tokens = max_new_tokens
        gen_config.do_sample = not params.is_greedy
        if not params.is_greedy:
            gen_config.temperature = params.temperature
            gen_config.top_p = params.top_p
            gen_config.top_k = params.top_k
            if params.seed is not None:
                torch.manual_seed(params.seed)
        return gen_config

    def _output(self, request_id, prompt, ids, tokens, params, max_new, metrics) -> RequestOutput:
        reason = None
        for n, token in enumerate(tokens, 1):
            reason = stop_reason(token, n, max_new, params, self.eos_token_ids)
            if reason is not None:
                del tokens[n:]
                del metrics.token_times[n:]
                break
        text, matched = self.checker.apply_stop_strings(tokens, params.stop or ())
        return RequestOutput(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=ids,
            token_ids=tokens,
            text=text,
            finish_reason="stop" if matched else (reason or "length"),
            metrics=metrics,
        )

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SequentialPipeline(_GenerateBaseline):
    """The baseline: one process, same model, device and dtype; each request alone, in order."""

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype=None):
        super().__init__(model, device, dtype)

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        prompts = as_prompt_list(prompts)
        params = params_list(prompts, sampling_params)
        checked = [(self.checker.token_ids(p), sp) for p, sp in zip(prompts, params)]
        arrival = time.monotonic()
        return [
            self._one(i, p, ids, sp, arrival)
            for i, (p, (ids, sp)) in enumerate(zip(prompts, checked))
        ]

    @torch.inference_mode()
    def _one(self, request_id, prompt, ids, params: SamplingParams, arrival) -> RequestOutput:
        max_new = self.checker.max_new_tokens(len(ids), params)
        gen_config = self._generation_config(params, max_new)
        kwargs = {}
        if params.stop:
            gen_config.stop_strings = list(params.stop)
            kwargs["tokenizer"] = self.tokenizer
        streamer = _StepTimes()
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=gen_config,
            streamer=streamer,
            **kwargs,
        )
        metrics = RequestMetrics(arrival, streamer.times, time.monotonic())
        tokens = out[0, len(ids) :].tolist()
        return self._output(request_id, prompt, ids, tokens, params, max_new, metrics)


class BatchedPipeline(_GenerateBaseline):
    """Static batching: up to ``batch_size`` requests left-padded into one ``generate()`` call
    that runs until the batch's longest request is done; no request joins a running batch.

    A request's tokens are timed at the decoding step that produced them and it finishes at its
    own last token (as a streaming client would see it), not when the whole batch returns.
    Requests of one batch share their sampling settings; only ``max_new_tokens`` may differ.
    """

    def __init__(
        self, model: str | None = None, *, device: str = "auto", dtype=None, batch_size: int = 20
    ):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        super().__init__(model, device, dtype)
        self.batch_size = batch_size

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """Run the prompts in order, ``batch_size`` at a time."""
        prompts = as_prompt_list(prompts)
        params = params_list(prompts, sampling_params)
        outputs: list[RequestOutput] = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            batch = self.generate_batch(prompts[start:end], params[start:end])
            for i, out in enumerate(batch, start):
                out.request_id = i
            outputs += batch
        return outputs

    @torch.inference_mode()
    def generate_batch(self, prompts, params: list[SamplingParams]) -> list[RequestOutput]:
        """One static batch of at most ``batch_size`` requests, all arriving now."""
        if not 1 <= len(prompts) <= self.batch_size:
            raise InvalidRequestError(
                f"a batch holds 1 to {self.batch_size} requests, got {len(prompts)}"
            )
        shared = {(sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.ignore_eos) for sp in params}
        if len(shared) > 1 or any(sp.stop or sp.stop_token_ids for sp in params):
            raise InvalidRequestError(
                "requests of one static batch must share their sampling settings (only "
                "max_new_tokens may differ) and cannot use stop strings or stop_token_ids"
            )
        ids = [self.checker.token_ids(p) for p in prompts]
        arrival = time.monotonic()
        max_new = [self.checker.max_new_tokens(len(x), sp) for x, sp in zip(ids, params)]
        gen_config = self._generation_config(params[0], max(max_new))
        width = max(len(x) for x in ids)
        # input_ids, attention_mask: [B, width], prompts right-aligned (left padding)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x) :] = torch.tensor(x)
            attention_mask[row, width - len(x) :] = 1
        streamer = _StepTimes()
        out = self.model.generate(
            input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=gen_config,
            streamer=streamer,
        )
        new_tokens = out[:, width:].tolist()
        outputs = []
        for i, (prompt, x, sp, n) in enumerate(zip(prompts, ids, params, max_new)):
            tokens = new_tokens[i][:n]
            times = streamer.times[: len(tokens)]
            metrics = RequestMetrics(arrival, times, None)
            out_i = self._output(i, prompt, x, tokens, sp, n, metrics)
            metrics.finish_time = metrics.token_times[-1] if metrics.token_times else arrival
            outputs.append(out_i)
        return outputs
