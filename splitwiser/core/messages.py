"""Every message between the parent and its workers. Small and typed: ids, not tensors.

Each worker has two pipes of its own. Parent -> worker: pickled by the sender, written by a
parent thread (a busy worker never blocks the engine loop); worker -> parent: written by the
worker, read by the engine loop. One writer per pipe and no locks or named semaphores between
processes, so a killed worker wedges nothing and leaves nothing behind. The only tensors travel
in ``KVCopy``, used by the copy handoff that exists to measure what the shared handoff saves.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch

from splitwiser.sampling import SamplingParams


@dataclass
class KVCopy:
    """One request's prompt K/V for the copy handoff, ``[layers, 2, prompt_len, kv_heads, D]``.

    On CPU a tensor in shared memory. On CUDA the prompt worker's own device buffer, pickled with
    its CUDA IPC handle by the prompt worker: the parent forwards the bytes unopened (a tensor
    received over CUDA IPC cannot be shared onwards) and the token worker copies it device to
    device into its blocks."""

    nbytes: int
    tensor: torch.Tensor | None = None
    cuda_ipc: bytes | None = None

    def open(self) -> torch.Tensor:
        return self.tensor if self.tensor is not None else pickle.loads(self.cuda_ipc)


@dataclass
class RequestSpec:
    """What a worker needs to know about a request."""

    request_id: int
    params: SamplingParams
    seed: int  # base seed of the per-token generators (drawn by the parent if params.seed is None)
    max_new_tokens: int  # params.max_new_tokens capped by the model's context


# ---------------------------------------------------------------- parent -> workers


@dataclass
class PrefillMsg:
    """Prefill these prompts, or chunks of them (one packed forward pass)."""

    requests: list[RequestSpec]
    token_ids: list[list[int]]  # each request's prompt, or its next chunk
    block_ids: list[list[int]]  # each request's blocks so far, enough for its whole prefill
    # tokens of each request already in its blocks (a cached prefix, earlier chunks): its chunk
    # starts there
    num_computed: list[int] = field(default_factory=list)


@dataclass
class HandoffMsg:
    """A prefilled request joins a token worker's batch; its prompt's K/V sit in its blocks."""

    request: RequestSpec
    block_ids: list[int]  # its blocks so far (``GrantMsg`` adds more as it decodes)
    prompt_len: int  # tokens cached in the blocks
    first_token: int  # sampled by the prompt worker, not yet cached
    published_at: float  # time.monotonic() when the prompt worker published the prefill
    kv_copy: KVCopy | None = None  # copy handoff only


@dataclass
class RunMsg:
    """Run a request through both phases (colocated worker): prefill ``token_ids`` in chunks
    into its blocks, then decode it."""

    request: RequestSpec
    token_ids: list[int]  # what to prefill: the prompt (resumed: and its output but the last)
    block_ids: list[int]  # its blocks so far (``GrantMsg`` adds more as it decodes)
    # resumed: its last generated token, the first decode input (not reported again); None:
    # sample the first token after the prefill
    next_token: int | None = None
    num_computed: int = 0  # leading tokens of ``token_ids`` already in its blocks (cached)


@dataclass
class GrantMsg:
    """More blocks for decoding requests, appended to their block tables: sent ahead of need,
    so a worker's step loop never waits for memory."""

    request_ids: list[int]
    block_ids: list[list[int]]  # per request, its new blocks in order


@dataclass
class AbortMsg:
    """Stop decoding these requests (a stop string matched, the caller cancelled, or the pool
    needs their blocks); the worker answers with a ``ReleasedMsg``."""

    request_ids: list[int]


@dataclass
class ShutdownMsg:
    """Finish the current step and exit."""


# ---------------------------------------------------------------- workers -> parent


@dataclass
class ReadyMsg:
    """The worker mapped the weights and the pool and is ready for work."""

    name: str
    pid: int
    uss_before_weights: int  # bytes of private memory before the model was unpickled
    uss_after_weights: int  # ... and after: the difference is what mapping the weights cost
    heap_reserved: int  # bytes of heap faulted in for prefill temporaries (CPU prompt worker)
    num_params_shared: int  # parameters whose storage is shared with the parent
    num_params: int
    mps_env: dict[str, str]  # the CUDA_MPS_* variables the worker runs with


@dataclass
class PrefillDoneMsg:
    """A prefill batch finished; its K/V are complete (kernels finished before the send)."""

    request_ids: list[int]
    first_tokens: list[int]
    published_at: float
    kv_copies: list[KVCopy] | None = None  # copy handoff only, one per request
    batch_tokens: int = 0
    compute_s: float = 0.0
    # per request, its first token's TokenLogprobs (None: not asked for); None: none asked
    first_logprobs: list | None = None


@dataclass
class TokensMsg:
    """One decode step's output."""

    request_ids: list[int]
    tokens: list[int]
    finished: list[bool]  # the worker is done with the request and its blocks (stop_reason)
    # admitted this step: request id -> seconds from the prefill's publish to the admission
    handoff_s: dict[int, float] = field(default_factory=dict)
    step_s: float = 0.0
    started_at: float = 0.0  # time.monotonic() when the step began (one clock for all processes)
    # colocated worker: prompt tokens prefilled in the same step (0: a decode-only step); the
    # step's tokens include the first token of each request whose prefill ended in it
    num_prefill_tokens: int = 0
    # per token, its TokenLogprobs (None: not asked for); None: no request of the step asked
    logprobs: list | None = None


@dataclass
class ReleasedMsg:
    """Aborted (or preempted) requests this worker no longer touches: their blocks may go."""

    request_ids: list[int]


@dataclass
class WorkerErrorMsg:
    """A batch failed with an exception; its requests fail with this message."""

    request_ids: list[int]
    error: str
