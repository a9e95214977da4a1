"""How a prefilled prompt's K/V reach the token worker that decodes it: one module per way, one
registry line each, chosen once from ``EngineConfig.kv_handoff`` (``select_handoff``).

The prompt worker asks where its prefill writes K/V (``prefill_target``) and, once the kernels
finished, what travels with each request (``publish``); the token worker puts what it received
in place before the request joins its batch (``receive``); the parent's scheduler asks whether a
prompt may be prefilled in chunks (``allows_chunked_prefill``)."""

from __future__ import annotations

from typing import Protocol

import torch

from splitwiser.config import EngineConfig
from splitwiser.core import messages as m
from splitwiser.handoff.copy import CopyHandoff
from splitwiser.handoff.shared import SharedHandoff


class Handoff(Protocol):
    name: str
    # a prompt over the prefill budget may go in chunks, each into the request's own blocks
    allows_chunked_prefill: bool

    def prefill_target(
        self, kv_pool: torch.Tensor, num_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, bool]:
        """Where a prefill batch of ``num_tokens`` writes its K/V, and whether to slots
        ``0..num_tokens-1`` of it (``contiguous_slots``) rather than the requests' blocks."""

    def publish(
        self, target: torch.Tensor, token_ids: list[list[int]], device: torch.device
    ) -> list[m.KVCopy] | None:
        """After the prefill kernels finished: what travels to the token worker with each
        request (``None``: nothing, the K/V already sit in its blocks)."""

    def receive(
        self, handoff: m.HandoffMsg, kv_pool: torch.Tensor, block_size: int, device: torch.device
    ) -> None:
        """Token worker, before the request joins its batch: its K/V in its blocks."""


HANDOFFS: dict[str, Handoff] = {h.name: h for h in (SharedHandoff(), CopyHandoff())}


def select_handoff(config: EngineConfig) -> Handoff:
    """The handoff ``config`` asks for (validated by ``EngineConfig``)."""
    return HANDOFFS[config.kv_handoff]


__all__ = ["HANDOFFS", "Handoff", "select_handoff"]
