"""One request's state in the parent: the phase is a routing decision, the counters the state.

Every change of a request's status and of the worker that owns it happens in this module, through
the methods of :class:`Request`; a worker's load is the number of requests it owns (see
``EngineCore.load``), never a counter kept beside them.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from splitwiser.core.messages import HandoffMsg, RequestSpec
from splitwiser.handle import RequestHandle
from splitwiser.outputs import RequestMetrics, RequestOutput
from splitwiser.sampling import SamplingParams

# sampling.token_generator seeds the generator of token i with (seed * _SEED_STRIDE + i) mod 2**63
_SEED_STRIDE = 1_000_003
_SEED_MOD = 2**63
_SEED_STRIDE_INVERSE = pow(_SEED_STRIDE, -1, _SEED_MOD)

WorkerKey = tuple[str, int]  # (role, index): splitwiser-token-1 is the second token worker


def seed_for_offset(seed: int, offset: int) -> int:
    """The seed whose token ``i`` draws what token ``i + offset`` of ``seed`` draws.

    A resumed request restarts a token worker's count of generated tokens; shifting the seed
    keeps every token on the generator it had before, so seeded sampling stays reproducible.
    """
    return (seed + offset * _SEED_STRIDE_INVERSE) % _SEED_MOD


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for a prefill batch (blocks may already be reserved)
    PREFILLING = "prefilling"  # in a prompt worker's batch
    DECODING = "decoding"  # prefilled: waiting for a decode slot, or handed off to one
    FINISHED = "finished"  # done (or failed); its blocks go once no worker owns it


@dataclass
class Request:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int  # params.max_new_tokens capped by the model's context
    metrics: RequestMetrics
    handle: RequestHandle | None = None  # the caller's view, filled as tokens come
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] | None = None  # its block table while admitted; grown as it decodes
    # the chained hash of each full block of prompt + output computed so far (prefix caching),
    # and how many leading blocks of ``block_ids`` are published (or were hits)
    block_hashes: list[int] = field(default_factory=list)
    num_published_blocks: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found cached at its first admission
    # preempted: its worker was told to drop it; on the release its blocks go and it waits again
    preempting: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)  # TokenLogprobs, if asked for
    # NOTE: the worker that may still write into the blocks; they are freed only once it is None
    owner: WorkerKey | None = None
    batch_id: int | None = None  # the prefill batch it is in, while PREFILLING
    # chunked prefill: tokens of ``prefill_token_ids`` whose K/V are in the blocks, and the
    # chunk its current batch prefills
    num_computed_tokens: int = 0
    num_scheduled_tokens: int = 0
    handoff: HandoffMsg | None = None  # prefilled, for the token worker that takes it
    finish_reason: str | None = None
    text: str = ""
    # losses in a row without a new token: each time the worker running it died or hung and
    # it was run again; a loss after progress starts a new count (the worker, not the request,
    # was at fault: a request that crashes every worker it touches never progresses)
    num_retries: int = 0
    num_output_at_retry: int = 0  # output tokens when last run again

    # ------------------------------------------------------------------ counters

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
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def prefill_token_ids(self) -> list[int]:
        """What a prefill caches: the prompt and, when resumed, every generated token but the
        last, which the decode takes as its next input (as after the first handoff)."""
        return self.prompt_token_ids + self.output_token_ids[:-1]

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_prompt_tokens + max(0, self.num_output_tokens - 1)

    @property
    def max_num_tokens(self) -> int:
        """The most tokens its blocks ever hold: the last generated token is never cached."""
        return self.num_prompt_tokens + self.max_new_tokens - 1

    def num_blocks_needed(self, block_size: int) -> int:
        """Blocks at its longest (a request that alone needs more than the pool never runs)."""
        return -(-self.max_num_tokens // block_size)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def spec(self) -> RequestSpec:
        """What the workers are told. A resumed request looks to them like a fresh one whose
        prompt is ``prefill_token_ids`` and whose first token is the last generated one: its
        token budget, its ``min_new_tokens`` and its seed are shifted by the tokens already
        generated before that."""
        offset = max(0, self.num_output_tokens - 1)
        params = self.params
        if offset and params.min_new_tokens:
            params = dataclasses.replace(
                params, min_new_tokens=max(0, params.min_new_tokens - offset)
            )
        return RequestSpec(
            self.request_id,
            params,
            seed_for_offset(self.seed, offset),
            self.max_new_tokens - offset,
        )

    # ------------------------------------------------------------------ transitions

    @property
    def num_prefill_left(self) -> int:
        return self.num_prefill_tokens - self.num_computed_tokens

    def start_prefill(
        self, worker: WorkerKey, batch_id: int | None, now: float, num_tokens: int | None = None
    ) -> None:
        """WAITING -> PREFILLING in ``worker``'s batch ``batch_id`` (colocated: None), for a
        chunk of ``num_tokens`` (None: all that is left)."""
        assert self.status is RequestStatus.WAITING and self.block_ids is not None
        self.status, self.owner, self.batch_id = RequestStatus.PREFILLING, worker, batch_id
        self.num_scheduled_tokens = self.num_prefill_left if num_tokens is None else num_tokens
        self.metrics.first_scheduled_time = self.metrics.first_scheduled_time or now

    def chunk_prefilled(self) -> bool:
        """Its batch's chunk is in the blocks; True when that was the last one (then
        PREFILLING -> DECODING, see ``prefilled``), else back to WAITING for the next chunk."""
        assert self.status is RequestStatus.PREFILLING
        self.num_computed_tokens += self.num_scheduled_tokens
        self.num_scheduled_tokens = 0
        if self.num_prefill_left == 0:
            self.prefilled()
            return True
        self.status, self.owner, self.batch_id = RequestStatus.WAITING, None, None
        return False

    def prefilled(self) -> None:
        """PREFILLING -> DECODING: the prompt worker is done with the blocks."""
        assert self.status is RequestStatus.PREFILLING
        self.status, self.owner, self.batch_id = RequestStatus.DECODING, None, None

    def decoding_in_place(self) -> None:
        """PREFILLING -> DECODING in the same (colocated) worker, which keeps the blocks."""
        assert self.status is RequestStatus.PREFILLING
        self.status, self.batch_id = RequestStatus.DECODING, None

    def hand_off(self, worker: WorkerKey) -> HandoffMsg:
        """A prefilled request joins ``worker``'s decode batch; returns what to send it."""
        assert self.status is RequestStatus.DECODING and self.handoff is not None
        handoff, self.handoff, self.owner = self.handoff, None, worker
        return handoff

    def let_go(self) -> None:
        """Its worker no longer touches its blocks (done, aborted, or dead)."""
        self.owner, self.batch_id = None, None

    def requeue(self) -> None:
        """Back to WAITING (its worker was lost, or it was preempted; its blocks already went):
        prefilled again with its output so far, from what the prefix cache still holds."""
        assert self.block_ids is None
        self.status, self.owner, self.preempting = RequestStatus.WAITING, None, False
        self.batch_id, self.handoff = None, None
        self.num_published_blocks = 0
        # NOTE: from the start: the chunk its lost worker was writing may be half written
        self.num_computed_tokens = self.num_scheduled_tokens = 0

    def finish(self, reason: str | None, now: float, text: str) -> None:
        """FINISHED with ``reason`` (``None``: failed). The blocks stay until ``owner`` is None."""
        self.status, self.finish_reason, self.text = RequestStatus.FINISHED, reason, text
        self.metrics.finish_time = now
        self.handoff = None

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.output_token_ids),
            text=self.text,
            finish_reason=self.finish_reason,
            metrics=self.metrics,
            logprobs=list(self.output_logprobs) if self.params.logprobs is not None else None,
            num_cached_tokens=self.num_cached_tokens or 0,
        )
