"""Runs the two phases on a model front-end (``splitwiser.models.registry``).

``prefill`` runs a batch of prompt chunks: whole prompts, packed into one flat batch attending
over their fresh K/V; or chunks whose prompt prefix is already in the pool, mixed with decode
tokens (a chunk of one) in one forward, vLLM v1's step. ``decode`` runs one token per running
request of the token worker's persistent ``DecodeBatch``. On CUDA, decode replays a CUDA graph
captured per batch-size bucket at start-up, the batch padded to its bucket with scratch rows; on
CPU (or with ``enforce_eager``) the same code runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitwiser.kv.pool import slots_for
from splitwiser.layers.attention import AttentionMetadata
from splitwiser.models.registry import build_model
from splitwiser.worker.decode_batch import DecodeBatch


@dataclass
class PrefillSeq:
    """One request's tokens in a ``prefill`` batch: a chunk of its prompt (the whole prompt when
    ``num_computed`` is 0), or its decode token (a chunk of one)."""

    token_ids: list[int]  # the chunk: positions num_computed .. num_computed + len - 1
    block_ids: list[int]  # the request's blocks in the pool (unused with a staging buffer)
    num_computed: int = 0  # the request's tokens whose K/V already sit in its blocks


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode CUDA graphs' batch sizes: 1, 2, 4, 8, then every 8 up to ``max_num_seqs``."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += range(8, max_num_seqs, 8)
    return sorted({*sizes, max_num_seqs})


class ModelRunner:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        block_size: int,
        device: torch.device,
        *,
        model_impl: str = "splitwiser",
        max_model_len: int = 2048,
        fuse: bool = False,
    ):
        self.model = build_model(hf_model, model_impl, max_model_len, fuse)
        self.block_size = block_size
        self.device = device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def prefill(
        self, seqs: list[PrefillSeq], kv_target: torch.Tensor, contiguous_slots: bool = False
    ) -> torch.Tensor:
        """Run each seq's chunk, write its K/V into ``kv_target``, return the logits of each
        chunk's last token [B, vocab], in ``seqs``' order.

        With ``contiguous_slots`` (whole prompts only) the K/V go to slots 0..num_tokens-1 of
        ``kv_target`` (a staging buffer for the copy handoff) instead of the requests' blocks.
        """
        if all(s.num_computed == 0 for s in seqs):
            return self._prefill_prompts(seqs, kv_target, contiguous_slots)
        if contiguous_slots:
            raise ValueError("contiguous_slots stages whole prompts only (num_computed == 0)")
        return self._prefill_mixed(seqs, kv_target)

    def _prefill_prompts(self, seqs, kv_target, contiguous_slots: bool) -> torch.Tensor:
        """Whole prompts, nothing cached: one causal SDPA call over their own fresh K/V."""
        lens = [len(s.token_ids) for s in seqs]
        max_len = max(lens)
        starts, input_ids, positions, padded = [0], [], [], []
        for i, (seq, n) in enumerate(zip(seqs, lens)):
            input_ids += seq.token_ids
            positions += range(n)
            padded += range(i * max_len, i * max_len + n)
            starts.append(starts[-1] + n)
        if contiguous_slots:
            slots = torch.arange(starts[-1], device=self.device)
        else:
            slots = torch.cat(
                [slots_for(s.block_ids, n, self.block_size) for s, n in zip(seqs, lens)]
            ).to(self.device, non_blocking=True)
        meta = AttentionMetadata(
            is_prefill=True,
            kv_cache=kv_target,
            block_size=self.block_size,
            slot_mapping=slots,
            query_starts=self._long(starts),
            max_query_len=max_len,
            padded_index=self._long(padded) if len(seqs) > 1 else None,
        )
        hidden = self.model.forward(self._long(input_ids), self._long(positions), meta)
        return self.model.logits(hidden[self._long([s - 1 for s in starts[1:]])])

    def _prefill_mixed(self, seqs: list[PrefillSeq], kv_pool: torch.Tensor) -> torch.Tensor:
        """Chunks over their requests' cached prefix, decode tokens among them: one forward, the
        one-token seqs packed first (``AttentionMetadata``'s mixed layout)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids) > 1)
        num_decodes = sum(len(s.token_ids) == 1 for s in seqs)
        chunk_len = max(len(s.token_ids) for s in seqs)
        context_lens = [seqs[i].num_computed + len(seqs[i].token_ids) for i in order]
        num_blocks = -(-max(context_lens) // self.block_size)
        starts, input_ids, positions, rows, padded, table = [0], [], [], [], [], []
        last = [0] * len(seqs)  # each seq's last token in the flat batch, in seqs' order
        for row, (i, context_len) in enumerate(zip(order, context_lens)):
            seq, n = seqs[i], len(seqs[i].token_ids)
            needed = -(-context_len // self.block_size)
            if len(seq.block_ids) < needed:
                raise ValueError(f"{context_len} tokens need {needed} blocks, got {seq.block_ids}")
            input_ids += seq.token_ids
            positions += range(seq.num_computed, context_len)
            rows += [row] * n
            if row >= num_decodes:
                first = (row - num_decodes) * chunk_len
                padded += range(first, first + n)
            # the unused tail of a row: any valid block, masked out
            table.append(seq.block_ids[:needed] + [0] * (num_blocks - needed))
            starts.append(starts[-1] + n)
            last[i] = starts[-1] - 1
        device_table = torch.tensor(table, dtype=torch.int32).to(self.device, non_blocking=True)
        device_positions = self._long(positions)  # [T]
        block = device_table[self._long(rows), device_positions // self.block_size].long()
        decode_lens, chunk_lens = context_lens[:num_decodes], context_lens[num_decodes:]
        meta = AttentionMetadata(
            is_prefill=False,
            kv_cache=kv_pool,
            block_size=self.block_size,
            slot_mapping=block * self.block_size + device_positions % self.block_size,
            query_starts=self._long(starts),
            max_query_len=chunk_len,
            padded_index=self._long(padded),
            block_table=device_table,
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(self.device),
            max_context_len=max(decode_lens, default=1),
            num_decodes=num_decodes,
            max_chunk_context_len=max(chunk_lens, default=0),
            chunks_start_prompts=all(seqs[i].num_computed == 0 for i in order[num_decodes:]),
        )
        hidden = self.model.forward(self._long(input_ids), device_positions, meta)
        return self.model.logits(hidden[self._long(last)])

    # ------------------------------------------------------------------ decode

    def _decode_forward(self, batch: DecodeBatch, kv_pool: torch.Tensor, n: int, max_len):
        """Logits [n, vocab] of rows [0, n) of ``batch``: reads only its device tensors, so a
        CUDA graph of it replays with whatever the rows hold."""
        pos = batch.positions[:n]  # [n]
        table = batch.block_table[:n]  # [n, max_blocks]
        block = table.gather(1, (pos // self.block_size)[:, None])[:, 0].long()
        meta = AttentionMetadata(
            is_prefill=False,
            kv_cache=kv_pool,
            block_size=self.block_size,
            slot_mapping=block * self.block_size + pos % self.block_size,
            block_table=table,
            context_lens=(pos + 1).to(torch.int32),
            max_context_len=max_len,
        )
        return self.model.logits(self.model.forward(batch.input_ids[:n], pos, meta))

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch, kv_pool: torch.Tensor) -> torch.Tensor:
        """One step for every running row: append its input token's K/V, return [rows, vocab]."""
        n = batch.num_rows
        size = next((b for b in self.graphs if b >= n), None)
        if size is None:
            return self._decode_forward(batch, kv_pool, n, batch.max_context_len)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]

    @torch.inference_mode()
    def capture_decode_graphs(self, batch: DecodeBatch, kv_pool: torch.Tensor, sizes) -> None:
        """Capture one graph per batch size, largest first, sharing one memory pool. ``batch``
        must be empty: its scratch rows make the warm-up and capture write nothing real."""
        assert batch.num_rows == 0
        pool = None
        for size in sorted(sizes, reverse=True):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks kernels
                self._decode_forward(batch, kv_pool, size, None)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_forward(batch, kv_pool, size, None)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        self.graphs = dict(sorted(self.graphs.items()))  # smallest first, for decode's lookup
        torch.cuda.synchronize(self.device)
