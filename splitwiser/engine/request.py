"""One request's state in the parent: the phase is a routing decision, the counters the state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from splitwiser.engine.messages import RequestSpec
from splitwiser.outputs import RequestMetrics
from splitwiser.sampling import SamplingParams

# sampling.token_generator seeds the generator of token i with (seed * _SEED_STRIDE + i) mod 2**63
_SEED_STRIDE = 1_000_003
_SEED_MOD = 2**63
_SEED_STRIDE_INVERSE = pow(_SEED_STRIDE, -1, _SEED_MOD)


def seed_for_offset(seed: int, offset: int) -> int:
    """The seed whose token ``i`` draws what token ``i + offset`` of ``seed`` draws.

    A resumed request restarts a token worker's count of generated tokens; shifting the seed
    keeps every token on the generator it had before, so seeded sampling stays reproducible.
    """
    return (seed + offset * _SEED_STRIDE_INVERSE) % _SEED_MOD


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for a prefill batch (blocks may already be reserved)
    PREFILLING = "prefilling"  # in a prompt worker's batch
    DECODING = "decoding"  # handed off to a token worker
    FINISHED = "finished"


@dataclass
class Request:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int  # params.max_new_tokens capped by the model's context
    metrics: RequestMetrics
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] | None = None
    output_token_ids: list[int] = field(default_factory=list)
    prompt_worker: int | None = None
    token_worker: int | None = None
    finish_reason: str | None = None
    text: str = ""
    # NOTE: True while a worker may still write into the blocks; they are freed only after that
    owned_by_worker: bool = False
    cancelled: bool = False  # cancelled while in a prefill batch
    # losses in a row without a new token: each time the worker running it died or hung and
    # it was run again; a loss after progress starts a new count (the worker, not the request,
    # was at fault: a request that crashes every worker it touches never progresses)
    num_retries: int = 0
    num_output_at_retry: int = 0  # output tokens when last run again

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_resumed(self) -> bool:
        """Prefilled again after its token worker died: it already has output tokens."""
        return bool(self.output_token_ids)

    @property
    def prefill_token_ids(self) -> list[int]:
        """What a prefill caches: the prompt and, when resumed, every generated token but the
        last, which the decode takes as its next input (as after the first handoff)."""
        return self.prompt_token_ids + self.output_token_ids[:-1]

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_prompt_tokens + max(0, self.num_output_tokens - 1)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose K/V sit in the pool."""
        if self.status in (RequestStatus.WAITING, RequestStatus.PREFILLING):
            return 0
        return self.num_prefill_tokens

    def num_blocks_needed(self, block_size: int) -> int:
        # the last generated token is never cached
        num_tokens = self.num_prompt_tokens + self.max_new_tokens - 1
        return -(-num_tokens // block_size)

    def spec(self) -> RequestSpec:
        """What the workers are told. A resumed request looks to them like a fresh one whose
        prompt is ``prefill_token_ids`` and whose first token is the last generated one: its
        token budget and its seed are shifted by the tokens already generated before that."""
        offset = max(0, self.num_output_tokens - 1)
        return RequestSpec(
            self.request_id,
            self.params,
            seed_for_offset(self.seed, offset),
            self.max_new_tokens - offset,
        )
