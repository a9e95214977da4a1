"""A worker process's start-up: map the parent's weights and KV pool (shared memory on CPU, CUDA
IPC on GPU), set up what its role needs (a prefill workspace, a persistent decode batch with its
CUDA graphs), say it is ready, then run its role's loop (splitwiser.roles)."""

from __future__ import annotations

import os
import pickle
import signal

import psutil
import torch

from splitwiser.core import messages as m
from splitwiser.handoff import select_handoff
from splitwiser.kv.pool import KVLayout, prefill_workspace_bytes
from splitwiser.layers.linear import bound_primitive_caches
from splitwiser.models.shape import ModelShape
from splitwiser.roles import ROLES
from splitwiser.worker.context import (
    WorkerConfig,
    WorkerParts,
    for_attached_profiler,
    phase_range,
    settle,
)
from splitwiser.worker.decode_batch import DecodeBatch
from splitwiser.worker.heap import keep_freed_memory, reserve_heap
from splitwiser.worker.model_runner import ModelRunner, graph_batch_sizes

__all__ = ["WorkerConfig", "for_attached_profiler", "phase_range", "worker_main"]


def _uss() -> int:
    return psutil.Process().memory_full_info().uss


def worker_main(cfg: WorkerConfig, payload: bytes, in_conn, out_conn) -> None:
    """Entry point of a spawned worker. ``payload`` pickles (model, kv_pool) as shared handles."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops its workers.
    # SIGINT arrives blocked (see WorkerProc): ignore it, then unblock, dropping one pending
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    spec = ROLES[cfg.role]
    # NOTE: before anything touches CUDA: the driver reads the MPS variables when it initialises
    os.environ.update(cfg.engine.worker_env(spec.mps_share))
    try:
        with open("/proc/self/comm", "w") as f:  # visible in `ps`: sw-prompt-0, sw-token-1
            f.write(f"sw-{cfg.role}-{cfg.index}"[:15])
    except OSError:
        pass
    cfg = for_attached_profiler(cfg)
    keep_freed_memory()
    bound_primitive_caches()
    torch.set_num_threads(cfg.num_threads)
    device = torch.device(cfg.device)
    nice = cfg.engine.worker_nice(spec.phase, device)  # EngineConfig.phase_priority
    if nice:
        os.nice(nice)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    uss_before = _uss()
    model, kv_pool = pickle.loads(payload)  # maps the parent's storages: no copy
    params = list(model.parameters())
    for p in params:  # touch every page so USS shows whether the weights are private or shared
        p.sum()
    uss_after = _uss()
    graphs = device.type == "cuda" and cfg.model_impl == "splitwiser" and not cfg.enforce_eager
    runner = ModelRunner(
        model, cfg.block_size, device, model_impl=cfg.model_impl,
        max_model_len=cfg.max_model_len, fuse=graphs,
    )  # fmt: skip
    reserved = 0
    if spec.prefill_budget is not None and device.type == "cpu":  # the prefill's temporaries
        shape = ModelShape.from_hf(model.config)
        layout = KVLayout.from_shape(shape, cfg.block_size, params[0].dtype)
        reserved = prefill_workspace_bytes(model.config, layout, spec.prefill_budget(cfg))
        reserve_heap(reserved)
    batch = None
    if spec.decodes:  # decodes from a persistent batch
        batch = _decode_batch(cfg, kv_pool, device)
        if graphs:
            runner.capture_decode_graphs(batch, kv_pool, graph_batch_sizes(cfg.max_num_seqs))
    out_conn.send(
        m.ReadyMsg(
            name=cfg.name,
            pid=os.getpid(),
            uss_before_weights=uss_before,
            uss_after_weights=uss_after,
            heap_reserved=reserved,
            num_params_shared=sum(p.is_shared() for p in params),
            num_params=len(params),
            mps_env={k: v for k, v in os.environ.items() if k.startswith("CUDA_MPS_")},
        )
    )
    handoff = select_handoff(cfg.engine)
    spec.worker(WorkerParts(cfg, runner, kv_pool, in_conn, out_conn, device, batch, handoff)).run()
    # on CUDA: hand the parent's storages back now (their IPC reference counts), not at
    # interpreter teardown
    settle(device)
    del runner, model, kv_pool, params, batch


def _decode_batch(cfg: WorkerConfig, kv_pool: torch.Tensor, device) -> DecodeBatch:
    # the pool's last block is the scratch block no request owns (see kv_pool.allocate_pool)
    scratch = kv_pool.shape[2] // cfg.block_size - 1
    max_blocks = -(-cfg.max_model_len // cfg.block_size)
    return DecodeBatch(cfg.max_num_seqs, max_blocks, scratch, device)
