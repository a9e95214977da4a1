"""The copy handoff, which exists to measure what the shared one saves: the prompt worker writes
K/V to a private staging buffer, the bytes travel (CPU: shared memory through the parent; CUDA:
the buffer's IPC handle, copied device to device), and the token worker scatters them into the
request's blocks."""

from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import torch

from splitwiser.core import messages as m
from splitwiser.kv.pool import slots_for


class CopyHandoff:
    name = "copy"
    # NOTE: a prompt's K/V are staged outside the pool, whole: no chunks
    allows_chunked_prefill = False

    def prefill_target(
        self, kv_pool: torch.Tensor, num_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, bool]:
        layers, _, _, kv_heads, head_dim = kv_pool.shape
        staging = torch.empty(
            (layers, 2, num_tokens, kv_heads, head_dim), dtype=kv_pool.dtype, device=device
        )  # [layers, 2, num_tokens, kv_heads, head_dim]
        return staging, True

    def publish(
        self, target: torch.Tensor, token_ids: list[list[int]], device: torch.device
    ) -> list[m.KVCopy] | None:
        kv_copies, start = [], 0
        for t in token_ids:
            kv = target[:, :, start : start + len(t)]
            start += len(t)
            nbytes = kv.numel() * kv.element_size()
            if device.type == "cuda":  # stays on the device; the IPC handle travels
                kv_copies.append(m.KVCopy(nbytes, cuda_ipc=bytes(ForkingPickler.dumps(kv))))
            else:
                kv_copies.append(m.KVCopy(nbytes, tensor=kv.clone()))
        # buffers of earlier batches whose token workers are done with them
        if device.type == "cuda":
            torch.cuda.ipc_collect()
        return kv_copies

    def receive(
        self, handoff: m.HandoffMsg, kv_pool: torch.Tensor, block_size: int, device: torch.device
    ) -> None:
        slots = slots_for(handoff.block_ids, handoff.prompt_len, block_size, device)
        kv = handoff.kv_copy.open()  # CUDA: maps the prompt worker's buffer
        kv_pool[:, :, slots] = kv  # device to device on CUDA
        if device.type == "cuda":  # the handoff ends when the K/V are in place
            torch.cuda.synchronize(device)
        del kv  # CUDA: the prompt worker may free its buffer now
