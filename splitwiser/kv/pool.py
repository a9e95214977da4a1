"""The KV block pool: ONE dedicated allocation, made once by the parent and mapped by every worker.

Layout ``[num_layers, 2 (key, value), num_blocks * block_size, num_kv_heads, head_dim]``: a token's
*slot* is ``block_id * block_size + offset``, so writing and reading a request's K/V is an index
operation on its block ids. On CPU the storage lives in shared memory; on CUDA it is one
caching-allocator segment shared through a CUDA IPC handle. One block more than the allocator
hands out sits at the end: the *scratch block*, where a decode batch padded to a CUDA-graph size
writes its padding rows' K/V (see ``DecodeBatch``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from splitwiser.config import DEFAULT_CPU_KV_BYTES
from splitwiser.errors import ConfigError
from splitwiser.models.shape import ModelShape

SHM_DIR = "/dev/shm"  # where the CPU pool's shared storage lives
_SEGMENT = 2 << 20  # the CUDA caching allocator rounds large segments to 2 MiB
# CUDA, per worker process, estimated from above (none is running when the pool is sized): its
# context with lazily loaded modules, and what cuBLAS and Triton take beside the allocator's
WORKER_CONTEXT_BYTES = 512 << 20
LIBRARY_BYTES = 256 << 20
_GiB = float(1 << 30)


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_shape(cls, shape: ModelShape, block_size: int, dtype: torch.dtype) -> KVLayout:
        return cls(shape.num_layers, shape.num_kv_heads, shape.head_dim, block_size, dtype)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


def decode_workspace_bytes(
    model_config, layout: KVLayout, max_num_seqs: int, max_model_len: int
) -> int:
    """An upper estimate of one token worker's decode workspace on CUDA: the graphs' shared
    memory pool holds the largest batch's activations and logits (float32 and model dtype), plus
    the block table and a fixed allowance for cuBLAS and Triton."""
    itemsize = torch.empty((), dtype=layout.dtype).element_size()
    per_seq = model_config.vocab_size * (4 + itemsize) + _activation_bytes(model_config, itemsize)
    table = -(-max_model_len // layout.block_size) * 4
    return max_num_seqs * (per_seq + table) + LIBRARY_BYTES


def prefill_activation_bytes(model_config, layout: KVLayout, num_tokens: int) -> int:
    """About twice one prefill batch's temporaries (each token's activations, its Q/K/V and
    their padded copies; logits only for each sequence's last token)."""
    itemsize = torch.empty((), dtype=layout.dtype).element_size()
    kv = layout.num_kv_heads * layout.head_dim * itemsize
    per_token = _activation_bytes(model_config, itemsize) + 4 * kv
    return 2 * num_tokens * per_token


def prefill_workspace_bytes(model_config, layout: KVLayout, num_tokens: int) -> int:
    """What a prompt worker reserves at start-up on the CPU: ``prefill_activation_bytes``, at
    most 512 MiB."""
    return min(prefill_activation_bytes(model_config, layout, num_tokens), 1 << 29)


def _activation_bytes(model_config, itemsize: int) -> int:
    """One token's activations through a layer: hidden-sized and query-sized tensors, the MLP's."""
    hidden = model_config.hidden_size
    inner = (
        getattr(model_config, "intermediate_size", None)
        or getattr(model_config, "ffn_dim", None)  # OPT
        or 4 * hidden
    )
    return (3 * inner + 8 * hidden) * itemsize


def workers_device_bytes(
    config, layout: KVLayout, max_model_len: int, model_config=None, step_tokens: int = 0
) -> int:
    """An upper estimate of the device memory every worker process of ``config`` takes beyond
    the weights and the pool it maps: each one's context and libraries, each decoding worker's
    decode workspace and CUDA graphs, each prefilling worker's largest prefill (the colocated
    worker's: ``step_tokens``, its step budget). Without ``model_config``: contexts only."""
    per_worker = WORKER_CONTEXT_BYTES + LIBRARY_BYTES
    if model_config is None:
        return config.num_workers * per_worker
    decode = WORKER_CONTEXT_BYTES + decode_workspace_bytes(
        model_config, layout, config.max_num_seqs, max_model_len
    )  # its LIBRARY_BYTES included
    if config.colocated:
        return decode + prefill_activation_bytes(model_config, layout, step_tokens)
    prefill = per_worker + prefill_activation_bytes(model_config, layout, config.max_prefill_tokens)
    return config.num_prompt_workers * prefill + config.num_token_workers * decode


def gpu_kv_cache_bytes(
    *,
    total_bytes: int,
    used_bytes: int,
    utilization: float,
    workers_bytes: int,
    min_kv_bytes: int,
    max_model_len: int,
    num_workers: int,
) -> int:
    """The KV pool's bytes under ``gpu_memory_utilization`` (vLLM's arithmetic, for all of the
    pipeline's processes together): ``total_bytes * utilization`` is what they may use; the
    device memory in use now (``used_bytes``: this process's weights and context, measured)
    and what the workers will take (``workers_bytes``, estimated) come first; the pool gets the
    rest. Memory another process holds is in ``used_bytes`` too: the pool never counts on what
    is not free (vLLM refuses to start instead). Raises ``ConfigError`` when the rest is less
    than ``min_kv_bytes`` (one request of ``max_model_len`` tokens), saying what is needed."""
    requested = int(total_bytes * utilization)
    kv_bytes = requested - used_bytes - workers_bytes
    if kv_bytes >= min_kv_bytes:
        return kv_bytes
    needed = (used_bytes + workers_bytes + min_kv_bytes) / total_bytes
    advice = (
        f"raise gpu_memory_utilization to at least {math.ceil(needed * 100) / 100:.2f}, "
        if needed <= 1
        else "free device memory (other processes), "
    )
    raise ConfigError(
        f"gpu_memory_utilization {utilization:g} allows {requested / _GiB:.2f} GiB of the "
        f"device's {total_bytes / _GiB:.2f} GiB; {used_bytes / _GiB:.2f} GiB are in use (the "
        f"weights, this process's context, any other process's memory) and the {num_workers} "
        f"worker(s) need about {workers_bytes / _GiB:.2f} GiB, which leaves "
        f"{max(kv_bytes, 0) / _GiB:.2f} GiB for the KV pool, but it needs "
        f"{min_kv_bytes / _GiB:.2f} GiB to hold one request of max_model_len ({max_model_len}) "
        f"tokens: {advice}lower max_model_len, or set kv_cache_bytes or num_kv_blocks"
    )


def default_num_blocks(
    layout: KVLayout, device: torch.device, config, max_model_len: int, model_config=None
) -> int:
    """Blocks for ``config.kv_cache_bytes``; by default on CUDA what ``gpu_memory_utilization``
    leaves once the memory in use and the workers' are set aside (``gpu_kv_cache_bytes``), or on
    CPU enough for every token worker's full batch at full context, capped at 1 GiB."""
    budget = config.kv_cache_bytes
    if budget is None and device.type == "cuda":
        torch.cuda.empty_cache()  # what loading the weights left cached is not in use
        free, total = torch.cuda.mem_get_info(device)
        step_tokens = config.step_token_budget(device) if config.colocated else 0
        budget = gpu_kv_cache_bytes(
            total_bytes=total,
            used_bytes=total - free,
            utilization=config.gpu_memory_utilization,
            workers_bytes=workers_device_bytes(
                config, layout, max_model_len, model_config, step_tokens
            ),
            min_kv_bytes=layout.num_blocks_for(max_model_len) * layout.bytes_per_block,
            max_model_len=max_model_len,
            num_workers=config.num_workers,
        )
    elif budget is None:
        per_seq = layout.num_blocks_for(max_model_len) * layout.bytes_per_block
        budget = min(DEFAULT_CPU_KV_BYTES, per_seq * config.max_num_seqs * config.num_token_workers)
        free = shm_free_bytes()
        if free is not None:  # leave room in /dev/shm for everything else that lives there
            budget = min(budget, free // 2)
    return max(1, budget // layout.bytes_per_block)


def shm_free_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _expandable_segments_on() -> bool:
    names = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    conf = ",".join(os.environ.get(k, "") for k in names)
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def allocate_pool(layout: KVLayout, num_blocks: int, device: torch.device) -> torch.Tensor:
    """Allocate the pool as one tensor (``num_blocks`` and the scratch block): on CPU in shared
    memory, on CUDA as a caching-allocator segment of its own (a CUDA IPC handle covers a whole
    segment: no other tensor may share it)."""
    num_blocks += 1  # the scratch block
    shape = (
        layout.num_layers,
        2,
        num_blocks * layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
    )
    nbytes = num_blocks * layout.bytes_per_block
    if device.type == "cpu":
        free = shm_free_bytes()
        if free is not None and nbytes > free:
            raise ConfigError(
                f"the KV pool needs {nbytes / 2**20:.0f} MiB of shared memory but {SHM_DIR} has "
                f"{free / 2**20:.0f} MiB free; lower kv_cache_bytes or num_kv_blocks, or enlarge "
                f"{SHM_DIR} (docker: --shm-size)"
            )
        pool = torch.zeros(shape, dtype=layout.dtype)
        pool.share_memory_()
        return pool
    if _expandable_segments_on():
        raise ConfigError(
            "PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF) sets expandable_segments:True; the "
            "KV pool and the weights are shared through CUDA IPC handles of whole segments, which "
            "expandable segments break: remove that setting from the variable, or set "
            "expandable_segments:False"
        )
    # no cached free block to carve the pool from, and the segment rounded up to the
    # allocator's granularity belongs to the pool alone
    torch.cuda.empty_cache()
    rounded = -(-nbytes // _SEGMENT) * _SEGMENT
    segment = torch.zeros(rounded, dtype=torch.uint8, device=device)
    return segment[:nbytes].view(layout.dtype).view(shape)


def slots_for(
    block_ids: list[int], num_tokens: int, block_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Pool slots of token positions ``[0, num_tokens)`` of a request that owns ``block_ids``."""
    num_blocks = -(-num_tokens // block_size)
    blocks = torch.tensor(block_ids[:num_blocks], dtype=torch.long, device=device)
    offsets = torch.arange(block_size, dtype=torch.long, device=device)
    return (blocks[:, None] * block_size + offsets).flatten()[:num_tokens]
