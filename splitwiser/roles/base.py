"""What every worker role is: its parent side (``Role``: what work its ready workers get from the
core, what their reports do), its worker loop, and what its workers set up (``RoleSpec``).

A role acts on the core through the core's methods only (``owned_request``, ``record_phase``,
``admit_next``, ``queue_handoff``, ...); the core routes by the role in a worker's key and never
imports a role: the runtime builds them from ``splitwiser.roles.ROLES`` and hands them over.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from splitwiser.config import EngineConfig
from splitwiser.core import messages as m
from splitwiser.core.engine_core import EngineCore, Send
from splitwiser.core.request import RequestStatus, WorkerKey
from splitwiser.worker.context import WorkerConfig, WorkerParts


class Role(Protocol):
    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        """Work for this role's ready workers (their indices)."""

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        """A report of one of this role's workers."""

    def stop_msg(self, request_ids: list[int]):
        """The message that makes a worker let go of these requests (it answers with a
        ``ReleasedMsg``), or ``None`` where the worker lets go by itself (at the end of its
        batch)."""

    def loads(self, core: EngineCore) -> Counter:
        """Per worker index: the work it holds, as this role balances it."""


class WorkerLoop(Protocol):
    def run(self) -> None:
        """Serve the parent's messages until its ``ShutdownMsg``."""


@dataclass(frozen=True)
class RoleSpec:
    """A worker role, as the runtime and the worker's start-up see it."""

    name: str  # in the worker's key and process name: splitwiser-<name>-<index>
    make: Callable[[EngineConfig], Role]  # the parent side
    worker: Callable[[WorkerParts], WorkerLoop]  # the loop its workers run
    # the token budget of its largest prefill step (sizes the CPU prefill workspace); None:
    # its workers never prefill
    prefill_budget: Callable[[WorkerConfig], int] | None
    decodes: bool  # its workers keep a persistent decode batch (CUDA graphs on CUDA)
    # which of EngineConfig.mps_thread_percentage its workers take; None: no share of their own
    mps_share: int | None = None
    # the phase its workers run, for EngineConfig.phase_priority's niceness; None: both
    phase: str | None = None
    # scheduling order within a tick, lowest first (the token workers' handoffs first: their
    # K/V already occupy blocks)
    schedule_rank: int = 1
    # how many workers of this role ``config`` runs (0: none)
    num_workers: Callable[[EngineConfig], int] = lambda config: 0


def requests_per_worker(core: EngineCore, role: str) -> Counter:
    """Per worker index of ``role``: the requests it owns."""
    return Counter(r.owner[1] for r in core.owned_by_role(role))


def append_step(core: EngineCore, worker: WorkerKey, msg: m.TokensMsg, now: float) -> list[Send]:
    """A step's tokens, request by request; ``finished``: the worker let go of the request."""
    sends: list[Send] = []
    logprobs = msg.logprobs if msg.logprobs is not None else [None] * len(msg.tokens)
    for rid, token, done, lp in zip(msg.request_ids, msg.tokens, msg.finished, logprobs):
        req = core.owned_request(worker, rid)
        if req is None or req.preempting:  # preempted: its release is on its way, the
            continue  # recompute makes this token again
        if done:  # the worker applied the same stop rule: it let go of the request
            req.let_go()
        if req.is_finished:  # a stop string or an abort ended it; its release is on its way
            if req.owner is None:
                core.release(req)
            continue
        if req.status is RequestStatus.PREFILLING:  # colocated: its prefill ended in this step
            req.decoding_in_place()
        # the step wrote its input's K/V: the prompt and every output token so far but the
        # newest; published before the token can end the request and free its blocks
        core.publish(req, req.num_prompt_tokens + req.num_output_tokens)
        sends += core.append_token(req, token, now, lp)
    return sends
