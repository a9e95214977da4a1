"""One request's state in the parent: the phase is a routing decision, the counters the state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from splitwiser.outputs import RequestMetrics
from splitwiser.sampling import SamplingParams


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

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose K/V sit in the pool."""
        if self.status in (RequestStatus.WAITING, RequestStatus.PREFILLING):
            return 0
        return self.num_prompt_tokens + max(0, self.num_output_tokens - 1)

    def num_blocks_needed(self, block_size: int) -> int:
        # the last generated token is never cached
        num_tokens = self.num_prompt_tokens + self.max_new_tokens - 1
        return -(-num_tokens // block_size)
