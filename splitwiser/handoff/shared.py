"""The shared handoff: the prompt worker writes K/V straight into the request's blocks of the one
pool every worker maps, and only block ids travel."""

from __future__ import annotations

import torch

from splitwiser.core import messages as m


class SharedHandoff:
    name = "shared"
    allows_chunked_prefill = True

    def prefill_target(
        self, kv_pool: torch.Tensor, num_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, bool]:
        return kv_pool, False

    def publish(
        self, target: torch.Tensor, token_ids: list[list[int]], device: torch.device
    ) -> list[m.KVCopy] | None:
        return None

    def receive(
        self, handoff: m.HandoffMsg, kv_pool: torch.Tensor, block_size: int, device: torch.device
    ) -> None:
        pass  # the K/V are in the blocks already
