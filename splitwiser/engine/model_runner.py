"""Runs the two phases on a Hugging Face model whose attention is the paged one.

``prefill`` and ``decode`` are kept apart: prefill packs whole prompts and attends over their fresh
K/V; decode packs one token per request and attends over each request's slots in the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitwiser.engine.attention import ATTN_IMPLEMENTATION, PagedBatch
from splitwiser.engine.kv_pool import slots_for


@dataclass
class PrefillSeq:
    token_ids: list[int]
    block_ids: list[
        int
    ]  # the request's blocks in the pool (ignored when writing to a staging buffer)


@dataclass
class DecodeSeq:
    token_id: int  # the last generated token, not yet in the cache
    position: int  # its position == number of tokens already cached
    block_ids: list[int]


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded model to paged attention (weights untouched, no copy)."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.eval()
    model.requires_grad_(False)
    return model


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        block_size: int,
        device: torch.device,
        decode_attention: str = "per_request",
    ):
        self.model = prepare_model(model)
        self.block_size = block_size
        self.device = device
        self.decode_attention = decode_attention  # "per_request" or "padded"

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(
        self, seqs: list[PrefillSeq], kv_target: torch.Tensor, contiguous_slots: bool = False
    ) -> torch.Tensor:
        """Run whole prompts, write their K/V into ``kv_target``, return last logits [B, vocab].

        With ``contiguous_slots`` the K/V go to slots 0..total_tokens-1 of ``kv_target`` (a staging
        buffer for the copy handoff) instead of the requests' blocks.
        """
        starts, input_ids, positions = [0], [], []
        for seq in seqs:
            n = len(seq.token_ids)
            input_ids += seq.token_ids
            positions += range(n)
            starts.append(starts[-1] + n)
        if contiguous_slots:
            slots = torch.arange(starts[-1], device=self.device)
        else:
            slots = torch.cat(
                [
                    slots_for(s.block_ids, len(s.token_ids), self.block_size, self.device)
                    for s in seqs
                ]
            )
        batch = PagedBatch(True, kv_target, slots, starts)
        last = self._long([s - 1 for s in starts[1:]])
        return self._forward(input_ids, positions, batch, last)

    @torch.inference_mode()
    def decode(self, seqs: list[DecodeSeq], kv_pool: torch.Tensor) -> torch.Tensor:
        """One step for every running request: append its token's K/V, return logits [B, vocab]."""
        if self.decode_attention == "padded":
            batch = self._padded_batch(seqs, kv_pool)
        else:
            # each request's slots up to and including the new token's, which is the last one
            context = [
                slots_for(s.block_ids, s.position + 1, self.block_size, self.device) for s in seqs
            ]
            new_slots = torch.stack([c[-1] for c in context])
            batch = PagedBatch(False, kv_pool, new_slots, list(range(len(seqs) + 1)), context)
        last = torch.arange(len(seqs), device=self.device)
        return self._forward([s.token_id for s in seqs], [s.position for s in seqs], batch, last)

    def _padded_batch(self, seqs: list[DecodeSeq], kv_pool: torch.Tensor) -> PagedBatch:
        """Slots of every request padded to the longest context, built on the host and moved
        to the device in one copy each."""
        bs = self.block_size
        lengths = torch.tensor([s.position + 1 for s in seqs])  # [B], the new token included
        max_len = int(lengths.max())
        table = torch.zeros((len(seqs), -(-max_len // bs)), dtype=torch.long)  # [B, max_blocks]
        for i, s in enumerate(seqs):
            n = -(-(s.position + 1) // bs)
            table[i, :n] = torch.tensor(s.block_ids[:n])
        offsets = torch.arange(bs)
        slots = (table[:, :, None] * bs + offsets).flatten(1)[:, :max_len]  # [B, max_len]
        mask = torch.arange(max_len)[None, :] < lengths[:, None]  # [B, max_len]
        new_slots = slots[torch.arange(len(seqs)), lengths - 1]  # [B]
        return PagedBatch(
            False,
            kv_pool,
            new_slots.to(self.device),
            list(range(len(seqs) + 1)),
            padded_slots=slots.to(self.device),
            padded_mask=mask[:, None, None, :].to(self.device),
        )

    def _forward(self, input_ids, positions, batch: PagedBatch, last: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=self._long(input_ids).unsqueeze(0),  # [1, total_tokens]
            position_ids=self._long(positions).unsqueeze(0),  # [1, total_tokens]
            use_cache=False,
            logits_to_keep=last,
            paged_batch=batch,
        )
        return out.logits[0].float()  # [num_reqs, vocab]
