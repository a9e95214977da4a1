"""What a finished (or streaming) request returns to the caller."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Timestamps of one request, in seconds of ``time.monotonic()`` (one clock for all processes).

    TTFT, TPOT, ITL and E2E derive from them with the definitions of ``vllm bench serve``.
    """

    arrival_time: float
    token_times: list[float] = field(default_factory=list)  # one per generated token
    finish_time: float | None = None
    first_scheduled_time: float | None = None  # the prefill batch was dispatched
    # prompt worker publish -> token worker admission; includes waiting for the decode step in
    # progress, and for the copy handoff the scatter of the received K/V into the blocks
    handoff_s: float | None = None
    kv_bytes_copied: int = 0  # bytes of K/V that travelled through the parent (copy handoff only)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); ``None`` for a single token."""
        n = len(self.token_times)
        if n < 2 or self.finish_time is None:
            return None
        return (self.finish_time - self.token_times[0]) / (n - 1)

    @property
    def itl_s(self) -> list[float]:
        """Every gap between consecutive tokens."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class TokenLogprobs:
    """A generated token's log-probability and the ``logprobs`` most likely tokens' (of the
    model's distribution before temperature, top-k, top-p and masks, as vLLM's raw logprobs),
    most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability)


@dataclass
class RequestOutput:
    """The result of one request."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str  # decoded generated tokens, cut before a stop string
    # "stop" (EOS or stop string), "length", "abort" (cancelled), or None while running
    finish_reason: str | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprobs] | None = None  # one per generated token, if asked for
    # prompt tokens found in the prefix cache at its first scheduling (not prefilled again)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
