"""The OpenAI wire types ``splitwiser serve`` accepts, with vLLM's names and defaults.

Unknown fields are accepted and ignored (``extra="allow"``), as vLLM does: clients send fields
such as ``best_of``, ``user`` or ``continuous_usage_stats`` that change nothing here. A field the
runtime cannot honour with a non-neutral value (penalties) is refused with a 400
rather than ignored, so no client gets a silently different answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitwiser.sampling import MAX_LOGPROBS, SamplingParams
from splitwiser.server.errors import BadRequest


class WireMsg(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptionsMsg(WireMsg):
    include_usage: bool | None = False  # a last chunk with "choices": [] and "usage"
    continuous_usage_stats: bool | None = False  # "usage" on every chunk as well


class _SamplingFields(WireMsg):
    """The sampling fields completions and chat share (vLLM's defaults)."""

    model: str | None = None  # omitted or null: the served model
    temperature: float | None = None  # None: 1.0, as OpenAI and vLLM
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: no top-k filter
    n: int = 1  # choices per prompt
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptionsMsg | None = None
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # the prompt's and each choice's token ids in the answer
    # vLLM's: prefix-cache entries are shared only between requests with the same salt (tenants
    # that must not learn what others sent)
    cache_salt: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0

    @model_validator(mode="after")
    def _check(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if (self.presence_penalty or 0.0) != 0.0 or (self.frequency_penalty or 0.0) != 0.0:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        if (self.repetition_penalty or 1.0) != 1.0:
            raise ValueError("repetition_penalty is not supported (use 1.0)")
        if self.cache_salt is not None and not self.cache_salt:
            raise ValueError("Parameter 'cache_salt' must be a non-empty string if provided.")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """Top log-probabilities per generated token (0: the token's own); None: none."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def sampling_params(self, max_new_tokens: int, choice: int) -> SamplingParams:
        """The runtime's parameters for the ``choice``-th sample of a prompt."""
        seed = None if self.seed is None else self.seed + choice  # n > 1: distinct samples
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=max(0, self.top_k or 0),
                seed=seed,
                stop=self.stop or None,
                ignore_eos=self.ignore_eos,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                min_new_tokens=self.min_tokens,
                logprobs=self.num_logprobs,
                cache_salt=self.cache_salt,
            )
        except ValueError as exc:  # InvalidRequestError: a value out of range
            raise BadRequest(str(exc)) from None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequestMsg(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[list[int]] | list[str]
    max_tokens: int | None = 16
    echo: bool = False  # the prompt's text before the generated text
    add_special_tokens: bool = True
    logprobs: int | None = None  # each token's and the top N's log-probabilities

    @model_validator(mode="after")
    def _check_prompt(self):
        _check_num_logprobs("logprobs", self.logprobs)
        if self.logprobs is not None and self.echo:
            raise ValueError("echo with logprobs (the prompt's log-probabilities) is not supported")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        prompts = self.prompts
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Prompt cannot be empty")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids) per entry; a list of ints is one prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def _check_num_logprobs(name: str, value: int | None) -> None:
    if value is None:
        return
    if value < 0:
        raise ValueError(f"{name} must be non-negative")
    if value > MAX_LOGPROBS:
        raise ValueError(
            f"Requested sample logprobs of {value}, which is greater than max allowed: "
            f"{MAX_LOGPROBS}"
        )


class TextPartMsg(WireMsg):
    type: Literal["text"]
    text: str


class ChatMessageMsg(WireMsg):
    role: str
    content: str | list[TextPartMsg] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequestMsg(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageMsg] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI, still accepted
    max_completion_tokens: int | None = None  # None (both): up to the context
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False  # the template carries the special tokens
    logprobs: bool = False  # each token's log-probability ...
    top_logprobs: int | None = None  # ... and the top N's

    @model_validator(mode="after")
    def _check_length(self):
        _check_num_logprobs("top_logprobs", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class TokenizeRequestMsg(WireMsg):
    """``POST /tokenize``: ``prompt`` or (the chat form) ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageMsg] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_form(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequestMsg(WireMsg):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]
