"""One frozen configuration, validated once. The CLI reads its defaults from here."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from splitwiser.errors import ConfigError

KV_HANDOFF_MODES = ("shared", "copy")
MODEL_IMPLS = ("auto", "splitwiser", "transformers")
PHASE_PRIORITIES = ("prefill", "equal", "decode")
PHASE_CONTROLS = ("static", "slo")  # EngineConfig.phase_control
# the niceness given to the workers of the phase that yields (the most a process can take)
_YIELDING_NICE = 19
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# the split's options that a colocated pipeline has no use for (one worker, no handoff)
SPLIT_ONLY_OPTIONS = ("num_prompt_workers", "num_token_workers", "kv_handoff")
# CPU pools are capped at this size unless num_kv_blocks or kv_cache_bytes says otherwise
DEFAULT_CPU_KV_BYTES = 1 << 30


def _gpu_usable(init_cuda: bool) -> bool:
    if init_cuda:
        return torch.cuda.is_available()
    from splitwiser import mps

    # a GPU is what NVML sees, usable by a CUDA build of torch: never the CPU for "auto" because
    # CUDA misbehaved (under a broken MPS daemon CUDA reports no device at all)
    return bool(torch.version.cuda) and mps.gpu_present()


def resolve_device(device: str | torch.device, *, init_cuda: bool = True) -> torch.device:
    """``auto``, ``cpu`` or ``cuda[:i]`` -> a device. ``init_cuda=False``: decided without
    initialising CUDA in this process (one that starts and stops the MPS daemon, whose ``quit``
    waits for every client), and ``cuda`` keeps no index."""
    name = str(device)
    if name == "auto":
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1")
        name = "cuda" if not hidden and _gpu_usable(init_cuda) else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    if dev.type == "cuda" and not _gpu_usable(init_cuda):
        raise ConfigError(
            f"device {name!r} requested but no CUDA GPU is available; use device='cpu'"
        )
    if init_cuda and dev.type == "cuda" and dev.index is None:
        # workers call torch.cuda.set_device, which needs an index
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means float32 on CPU (exact) and bfloat16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'"
        ) from None


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes a pipeline. Values measured at start-up are not patched in here."""

    model: str | None = None  # HF directory, hub id, "random:<preset>", or None: embedded default
    num_prompt_workers: int = 1
    num_token_workers: int = 1
    device: str = "auto"
    dtype: str | torch.dtype | None = None
    kv_handoff: str = "shared"  # "shared": block ids only; "copy": K/V bytes through the parent
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from kv_cache_bytes
    kv_cache_bytes: int | None = None  # None: 1 GiB on CPU; on CUDA see gpu_memory_utilization
    # CUDA: the fraction of the device's memory all of Splitwiser's processes may use together
    # (vLLM's meaning): the weights, every worker's context, workspaces and graphs measured, the
    # rest to the KV pool. kv_cache_bytes and num_kv_blocks win where given. No effect on CPU
    gpu_memory_utilization: float = 0.9
    # automatic prefix caching (vLLM v1's, on by default): full blocks are hashed and kept after
    # their request ends; a later request with the same prefix is not prefilled again. None: on
    # wherever the handoff allows it (the copy handoff stages whole prompts: off)
    enable_prefix_caching: bool | None = None
    # blocks granted to a decoding request beyond the one it fills: a token worker never waits
    # on the parent for memory (with 0 it may sit out steps while its grant is on the way)
    num_lookahead_blocks: int = 1
    max_num_seqs: int = 64  # requests decoded together by one token worker
    # a prefilled request joins the fullest token worker with fewer than this many requests, so
    # at low load they decode in one batch as one engine's would (each step reads the weights
    # once for all of them); once every token worker has this many, the least loaded. 0: always
    # the least loaded
    decode_fill_seqs: int = 16
    max_prefill_tokens: int = 4096  # token budget of one prefill batch (longer prompts: chunks)
    # ONE colocated worker runs both phases (vLLM v1's policy) instead of prompt and token
    # workers; the baseline the split is measured against
    colocated: bool = False
    # colocated: the token budget of one step (decodes first, then prefill chunks). None: as
    # vLLM, 8192 on GPUs with 70 GiB or more (H100/H200 class), 2048 on smaller ones and on CPU
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    worker_threads: int | None = None  # torch threads per worker; None: cores / workers
    worker_start_timeout_s: float = 300.0
    worker_stop_timeout_s: float = 10.0
    # a rate, per role: at most max_worker_restarts restarts within any worker_restart_window_s
    # (a crash loop stops; occasional deaths over a long life never exhaust it)
    max_worker_restarts: int = 20
    worker_restart_window_s: float = 60.0
    # a worker with work outstanding that sends nothing for this long is hung: it is killed and
    # its requests are retried (generous: one prefill batch of a large model on a slow CPU can
    # take a while; worker_start_timeout_s applies during start-up). None: never
    worker_liveness_timeout_s: float | None = 120.0
    # times one request is run again after the worker running it died or hung, in a row
    # without producing a token; then it fails with WorkerCrashedError
    max_request_retries: int = 5
    # "splitwiser": Splitwiser's own model code (Llama, Mistral, Qwen2, OPT); "transformers":
    # the checkpoint's Hugging Face modules with the same paged attention; "auto": the first
    # where the architecture has it
    model_impl: str = "auto"
    # token workers on CUDA: no decode CUDA graphs (every step runs eagerly)
    enforce_eager: bool = False
    # NVTX ranges around each prefill batch and decode step, for Nsight tools (CUDA only)
    nvtx_ranges: bool = False
    # the workers, and on CUDA this process too, connect to the MPS daemon listening here
    mps_pipe_dir: str | None = None
    # (prompt, token) workers' CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; needs mps_pipe_dir
    mps_thread_percentage: tuple[int, int] | None = None
    # CPU: which phase's workers the OS favours where they share cores. "prefill": token
    # workers run at the lowest priority (nice 19), so waiting prompts are prefilled first and
    # decode runs at full batches (throughput and first tokens; later tokens wait); "decode":
    # prompt workers yield instead; "equal": neither. CUDA: no effect (the GPU is shared
    # through MPS, see mps_thread_percentage)
    phase_priority: str = "prefill"
    # "static": the prompt workers' share stays as configured; "slo": once per
    # phase_control_window_s, it moves toward the phase whose SLO the window's p90 misses
    # (splitwiser.core.phase_control: how many prompt workers run a batch at once, and the
    # prefill budget). Split only
    phase_control: str = "static"
    ttft_slo_ms: float | None = None  # phase_control "slo": the SLOs (None: that phase has none)
    tpot_slo_ms: float | None = None
    phase_control_window_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("num_prompt_workers", "num_token_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_num_batched_tokens is not None and (
            not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1
        ):
            raise ConfigError(
                f"max_num_batched_tokens must be a positive integer, got "
                f"{self.max_num_batched_tokens!r}"
            )
        if (
            self.colocated
            and (self.max_num_batched_tokens or self.max_num_seqs) < self.max_num_seqs
        ):
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running request decodes one token per step"
            )
        for name in ("block_size", "max_num_seqs", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_blocks is not None and (
            not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1
        ):
            raise ConfigError(
                f"num_kv_blocks must be >= 1 (the pool must hold at least one request), "
                f"got {self.num_kv_blocks!r}"
            )
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ConfigError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len!r}")
        if not (
            isinstance(self.gpu_memory_utilization, (int, float))
            and 0 < self.gpu_memory_utilization <= 1
        ):
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        if self.enable_prefix_caching and self.kv_handoff == "copy":
            raise ConfigError(
                "enable_prefix_caching needs the shared handoff: the copy handoff stages whole "
                "prompts; use kv_handoff='shared' or enable_prefix_caching=False"
            )
        if not isinstance(self.num_lookahead_blocks, int) or self.num_lookahead_blocks < 0:
            raise ConfigError(
                f"num_lookahead_blocks must be an integer >= 0, got {self.num_lookahead_blocks!r}"
            )
        if self.kv_handoff not in KV_HANDOFF_MODES:
            raise ConfigError(
                f"kv_handoff must be one of {', '.join(KV_HANDOFF_MODES)}, got {self.kv_handoff!r}"
            )
        if self.mps_thread_percentage is not None:
            split = tuple(self.mps_thread_percentage)
            if self.mps_pipe_dir is None:
                raise ConfigError("mps_thread_percentage needs mps_pipe_dir (an MPS daemon)")
            if len(split) != 2 or not all(isinstance(p, int) and 1 <= p <= 100 for p in split):
                raise ConfigError(
                    f"mps_thread_percentage is two percentages 1..100 (prompt, token), "
                    f"got {self.mps_thread_percentage!r}"
                )
        if self.phase_priority not in PHASE_PRIORITIES:
            raise ConfigError(
                f"phase_priority must be one of {', '.join(PHASE_PRIORITIES)}, "
                f"got {self.phase_priority!r}"
            )
        if self.phase_control not in PHASE_CONTROLS:
            raise ConfigError(
                f"phase_control must be one of {', '.join(PHASE_CONTROLS)}, "
                f"got {self.phase_control!r}"
            )
        for name in ("ttft_slo_ms", "tpot_slo_ms", "phase_control_window_s"):
            value = getattr(self, name)
            if (value is not None or name == "phase_control_window_s") and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            ):
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.phase_control == "slo" and self.colocated:
            raise ConfigError(
                "phase_control='slo' moves work between prompt and token workers: the colocated "
                "engine has neither (use phase_control='static')"
            )
        if self.model_impl not in MODEL_IMPLS:
            raise ConfigError(
                f"model_impl must be one of {', '.join(MODEL_IMPLS)}, got {self.model_impl!r}"
            )
        for name in ("max_worker_restarts", "max_request_retries", "decode_fill_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("worker_restart_window_s", "worker_liveness_timeout_s"):
            value = getattr(self, name)
            if (value is not None or name == "worker_restart_window_s") and not (
                isinstance(value, (int, float)) and value > 0
            ):
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.worker_threads is not None and self.worker_threads < 1:
            raise ConfigError(f"worker_threads must be >= 1, got {self.worker_threads!r}")

    @property
    def prefix_caching(self) -> bool:
        """``enable_prefix_caching``, resolved: on unless turned off or the handoff copies."""
        if self.enable_prefix_caching is None:
            return self.kv_handoff != "copy"
        return self.enable_prefix_caching

    @property
    def num_workers(self) -> int:
        """Worker processes in all (``splitwiser.roles.workers_per_role``: per role)."""
        return 1 if self.colocated else self.num_prompt_workers + self.num_token_workers

    def step_token_budget(self, device: torch.device) -> int:
        """``max_num_batched_tokens``, resolved for ``device`` (see the field)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            return 8192 if total >= 70 << 30 else 2048
        return 2048

    def worker_env(self, mps_share: int | None) -> dict[str, str]:
        """Environment a worker sets before CUDA starts: the MPS connection and its role's
        thread share (``mps_share``: which of ``mps_thread_percentage``; None: none)."""
        if self.mps_pipe_dir is None:
            return {}
        env = {"CUDA_MPS_PIPE_DIRECTORY": self.mps_pipe_dir}
        if self.mps_thread_percentage is not None and mps_share is not None:
            share = self.mps_thread_percentage[mps_share]
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(share)
        return env

    def worker_nice(self, phase: str | None, device: torch.device) -> int:
        """How much a worker that runs ``phase`` ("prefill" or "decode"; None: both) lowers its
        own CPU priority (``os.nice``): the phase ``phase_priority`` does not favour yields."""
        yielding = {"prefill": "decode", "decode": "prefill"}.get(self.phase_priority)
        return (
            _YIELDING_NICE
            if device.type == "cpu" and phase is not None and phase == yielding
            else 0
        )

    def threads_per_worker(self) -> int:
        if self.worker_threads is not None:
            return self.worker_threads
        return max(1, (os.cpu_count() or 1) // self.num_workers)
