"""The prompt worker's loop: batched prefill of whole prompts (a prompt over the token budget in
chunks), K/V written straight into the requests' blocks, published once the kernels finished."""

from __future__ import annotations

import time
import traceback
from multiprocessing.reduction import ForkingPickler

import torch

from splitwiser.core import messages as m
from splitwiser.sampling import sample_next, token_logprobs
from splitwiser.worker.main import get_msg, phase_range, settle, synchronize
from splitwiser.worker.model_runner import ModelRunner, PrefillSeq


class PromptWorker:
    def __init__(self, cfg, runner: ModelRunner, kv_pool, in_conn, out_conn, device):
        self.cfg, self.runner, self.kv_pool = cfg, runner, kv_pool
        self.in_conn, self.out_conn, self.device = in_conn, out_conn, device

    def run(self) -> None:
        while True:
            msg = get_msg(self.in_conn, block=True)  # 1) receive
            if isinstance(msg, m.ShutdownMsg):
                return
            try:
                self.out_conn.send(self.prefill(msg))
            except Exception:
                ids = [r.request_id for r in msg.requests]
                settle(self.device)
                self.out_conn.send(m.WorkerErrorMsg(ids, traceback.format_exc(limit=4)))

    def prefill(self, msg: m.PrefillMsg) -> m.PrefillDoneMsg:
        t0 = time.monotonic()
        computed = msg.num_computed or [0] * len(msg.token_ids)
        seqs = [PrefillSeq(*x) for x in zip(msg.token_ids, msg.block_ids, computed)]
        copy = self.cfg.kv_handoff == "copy"
        total = sum(len(t) for t in msg.token_ids)
        if copy:  # K/V go to a private staging buffer and then, through host memory, to the parent
            layers, _, _, kv_heads, head_dim = self.kv_pool.shape
            target = torch.empty(
                (layers, 2, total, kv_heads, head_dim), dtype=self.kv_pool.dtype, device=self.device
            )
        else:  # K/V go straight into the requests' blocks
            target = self.kv_pool
        with phase_range(self.cfg, self.device, f"prefill b={len(seqs)} t={total}"):
            logits = self.runner.prefill(seqs, target, contiguous_slots=copy)  # [B, vocab]
            rows = [(r.params, r.seed, 0) for r in msg.requests]
            new = sample_next(logits, rows, self.cfg.eos_token_ids)
            first = new.tolist()
            first_logprobs = token_logprobs(logits, new, rows)
        # NOTE: publish only after the prefill kernels finished: the token worker reads at once
        synchronize(self.device)
        done = time.monotonic()  # the K/V are ready: the handoff starts here, in both modes
        kv_copies = None
        if copy:
            kv_copies, start = [], 0
            for t in msg.token_ids:
                kv = target[:, :, start : start + len(t)]
                start += len(t)
                nbytes = kv.numel() * kv.element_size()
                if self.device.type == "cuda":  # stays on the device; the IPC handle travels
                    kv_copies.append(m.KVCopy(nbytes, cuda_ipc=bytes(ForkingPickler.dumps(kv))))
                else:
                    kv_copies.append(m.KVCopy(nbytes, tensor=kv.clone()))
            # buffers of earlier batches whose token workers are done with them
            if self.device.type == "cuda":
                torch.cuda.ipc_collect()
        return m.PrefillDoneMsg(
            request_ids=[r.request_id for r in msg.requests],
            first_tokens=first,
            published_at=done,
            kv_copies=kv_copies,
            first_logprobs=first_logprobs,
            batch_tokens=total,
            compute_s=done - t0,
        )
