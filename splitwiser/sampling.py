"""Sampling parameters and the token sampler shared by both phases."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitwiser.errors import InvalidRequestError
from splitwiser.outputs import TokenLogprobs

MAX_LOGPROBS = 20  # vLLM's default max_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (Hugging Face ``generate`` semantics).

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes sampling reproducible whatever else runs in the same batch. ``stop`` strings end
    the request when they appear in the output text; the text is cut before the stop string.
    Until ``min_new_tokens`` tokens are generated, EOS (unless ``ignore_eos``) and
    ``stop_token_ids`` cannot be drawn: their logits are masked, as Hugging Face's
    ``min_new_tokens`` masks EOS and vLLM's ``min_tokens`` masks both; stop strings apply at once.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default=())
    min_new_tokens: int = 0
    # return each generated token's log-probability and this many most likely tokens' (0: the
    # token's alone); None: none
    logprobs: int | None = None
    # prefix caching: requests with different salts never share cached blocks (vLLM's
    # ``cache_salt``: tenants that must not learn what others sent)
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequestError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise InvalidRequestError(
                f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}"
            )
        if self.logprobs is not None and not (
            isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequestError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}"
            )
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.cache_salt is not None and not (
            isinstance(self.cache_salt, str) and self.cache_salt
        ):
            raise InvalidRequestError(
                f"cache_salt must be a non-empty string or None, got {self.cache_salt!r}"
            )
        if self.stop is not None and any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``[vocab]`` a sampled (``temperature > 0``) request draws its next token
    from, given one row of logits ``[vocab]``: temperature, top-k, then top-p, as ``generate()``
    applies them, then softmax."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # NOTE: generate()'s and vLLM's rule, to the tie: in ascending order, drop the tokens
        # whose running mass stays <= 1 - top_p; the most likely token always stays
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - params.top_p
        drop_sorted[-1] = False
        drop = drop_sorted.scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of one row of logits ``[vocab]`` as a 0-d device tensor (no host sync)."""
    if params.is_greedy:
        return torch.argmax(logits.float())
    probs = sampling_probs(logits, params)
    # a draw from ``probs`` without leaving the device: argmax of p / E with E ~ Exp(1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return torch.argmax(probs / noise)


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row of logits ``[vocab]``."""
    return int(_sample_row(logits, params, generator))


def mask_early_stops(
    logits: torch.Tensor, rows: list[tuple[SamplingParams, int, int]], eos: tuple[int, ...]
) -> torch.Tensor:
    """``logits`` with the stop tokens of every row short of its ``min_new_tokens`` at -inf (a
    copy, only if some row needs it)."""
    masked = None
    for i, (p, _, n) in enumerate(rows):
        if n >= p.min_new_tokens:
            continue
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
        banned = sorted(t for t in banned if 0 <= t < logits.shape[-1])
        if banned:
            masked = logits.clone() if masked is None else masked
            masked[i, banned] = float("-inf")
    return logits if masked is None else masked


def sample_next(
    logits: torch.Tensor, rows: list[tuple[SamplingParams, int, int]], eos: tuple[int, ...] = ()
) -> torch.Tensor:
    """The next token of every row of ``logits`` ``[B, vocab]`` as a device tensor ``[B]``, with
    no host synchronisation; ``rows`` holds each row's (params, seed, index of the token), ``eos``
    the model's EOS ids (masked with the stop token ids before ``min_new_tokens``).
    Greedy rows come from one argmax over the batch; sampled rows are drawn one by one, each from
    its own seeded generator."""
    logits = mask_early_stops(logits, rows, eos)
    tokens = logits.argmax(dim=-1)
    for i, (p, seed, n) in enumerate(rows):
        if not p.is_greedy:
            tokens[i] = _sample_row(logits[i], p, token_generator(p, seed, n, logits.device))
    return tokens


def sample_tokens(
    logits: torch.Tensor, rows: list[tuple[SamplingParams, int, int]], eos: tuple[int, ...] = ()
) -> list[int]:
    """``sample_next`` brought to the host: one synchronisation for the whole batch."""
    return sample_next(logits, rows, eos).tolist()


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[tuple[SamplingParams, int, int]]
) -> list[TokenLogprobs | None] | None:
    """Each row's drawn token with its log-probability and its top ``logprobs``, for the rows
    that asked (None for the others; None if none did): one host synchronisation."""
    want = [i for i, (p, _, _) in enumerate(rows) if p.logprobs is not None]
    if not want:
        return None
    k = max(rows[i][0].logprobs for i in want)
    lp = torch.log_softmax(logits[want].float(), dim=-1)
    chosen = lp.gather(1, tokens[want].view(-1, 1)).squeeze(1)
    top = lp.topk(max(k, 1), dim=-1) if k else None
    chosen_l, tokens_l = chosen.tolist(), tokens[want].tolist()
    top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
    out: list[TokenLogprobs | None] = [None] * len(rows)
    for j, i in enumerate(want):
        n = rows[i][0].logprobs
        best = list(zip(top_i[j][:n], top_v[j][:n])) if n else []
        out[i] = TokenLogprobs(tokens_l[j], chosen_l[j], best)
    return out


def token_generator(
    params: SamplingParams, seed: int, index: int, device
) -> torch.Generator | None:
    """The generator for the ``index``-th generated token of a request.

    Seeded from (request seed, token index) alone, so a seeded request samples the same tokens
    whichever worker runs which token and whatever else shares the batch.
    """
    if params.is_greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + index) % (2**63))
    return gen
