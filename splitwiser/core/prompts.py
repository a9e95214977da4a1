"""Prompt validation and detokenisation, shared by both pipelines (the stop rule: stop.py)."""

from __future__ import annotations

from collections.abc import Sequence

from splitwiser.core.stop import StopStringMatcher, first_stop
from splitwiser.core.stop import stop_reason as stop_reason  # re-exported
from splitwiser.errors import InvalidRequestError
from splitwiser.sampling import SamplingParams

Prompt = str | list[int]


def as_prompt_list(prompts) -> list[Prompt]:
    """One prompt (a string or a list of token ids) or many, as a list of prompts."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def params_list(prompts: Sequence[Prompt], sampling_params) -> list[SamplingParams]:
    """One ``SamplingParams`` per prompt from ``None``, one shared value, or a sequence."""
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * len(prompts)
    if len(sampling_params) != len(prompts):
        raise InvalidRequestError(
            f"pass one SamplingParams or one per prompt; got {len(sampling_params)} for "
            f"{len(prompts)} prompts"
        )
    return list(sampling_params)


def submit_all(submit, prompts, sampling_params) -> list:
    """``generate()`` of the online pipelines: submit every prompt at once and wait for them in
    order. If a prompt is rejected, or the wait is interrupted, the requests already submitted
    are cancelled."""
    prompts = as_prompt_list(prompts)
    params = params_list(prompts, sampling_params)
    handles = []
    try:
        for p, sp in zip(prompts, params):
            handles.append(submit(p, sp))
        return [h.result() for h in handles]
    except BaseException:
        for h in handles:
            h.cancel()
        raise


def eos_token_ids(model) -> tuple[int, ...]:
    """The ids that end generation, as ``generate()`` sees them (generation config first)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = model.config.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)


class PromptChecker:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def token_ids(self, prompt: str | list[int]) -> list[int]:
        """Tokenise and validate a prompt (a string or a list of token ids)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; pass at least one token of text")
            ids = list(self.tokenizer(prompt).input_ids)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError("a token-id prompt must be a list of integers")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size})"
                )
        else:
            raise InvalidRequestError(
                f"a prompt is a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise InvalidRequestError("the prompt is empty; pass at least one token")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                f"tokens; shorten the prompt to at most {self.max_model_len - 1} tokens"
            )
        return ids

    def max_new_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """``max_new_tokens`` capped so prompt + output fit the context (finish_reason "length")."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"sampling_params must be a SamplingParams, got {type(params).__name__}"
            )
        return min(params.max_new_tokens, self.max_model_len - prompt_len)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def apply_stop_strings(self, token_ids: list[int], stop: tuple[str, ...]) -> tuple[str, bool]:
        """The text so far, cut before the first stop string; and whether one matched. Decodes
        every token: once per request (for one token at a time, ``stop_matcher``)."""
        text = self.decode(token_ids)
        found = first_stop(text, stop)
        return (text, False) if found is None else (text[: found[0]], True)

    def stop_matcher(self, stop: tuple[str, ...]) -> StopStringMatcher:
        """A request's stop strings, matched one token at a time (as ``apply_stop_strings``)."""
        return StopStringMatcher(self.tokenizer, stop)
