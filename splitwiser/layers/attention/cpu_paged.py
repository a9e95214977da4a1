"""The CPU's paged decode attention: a small C kernel (``csrc/paged_decode.c``) that reads each
request's K/V in place from the block pool, as vLLM's CPU build does with its own kernel.

The plain-torch path (``sdpa.paged_decode``) copies every running request's whole context out
of the pool at every step and layer, then runs a masked SDPA over the copy. The kernel reads each
key and value row once, where it lies (one layer of Llama-3.2-1B's attention at batch 128,
context 512: 29 against 114 ms on a 2-core CPU, ``bench/README.md``).

It is compiled on first use with the system's C compiler (``cc``, or ``$CC``) for this machine
(``-march=native``) into ``kernels/`` of Splitwiser's cache (``$SPLITWISER_CACHE`` or
``~/.cache/splitwiser``), keyed by the source, the flags and the CPU, and loaded with ``ctypes``:
a call releases the GIL and runs on torch's OpenMP threads (the kernel links ``libgomp`` by its
soname, which the process already has loaded from torch). Where it cannot be built or loaded
(no compiler, a read-only cache, another OS) or ``SPLITWISER_CPU_KERNELS=0``, ``paged_decode``
is not used and attention falls back to the gather path, after one log line that says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from splitwiser.cache import cache_root

log = logging.getLogger("splitwiser")

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
_ERRORS = {1: "heads not a multiple of K/V heads", 2: "group or head_dim too large",
           3: "a context longer than its block table", 4: "out of memory"}  # fmt: skip


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _host() -> str:
    """What ``-march=native`` compiles for: the machine and its CPU's feature flags."""
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith(("flags", "Features"))), ""
        )  # fmt: skip
    except OSError:
        flags = platform.node()
    return f"{platform.machine()} {flags}"


def _build(compiler: str) -> Path:
    """The shared object for this source, flags and host, compiled once (atomically: workers
    that start together each build into a temporary file, the first rename wins)."""
    text = b"\0".join(
        (SOURCE.read_bytes(), " ".join((compiler, *FLAGS)).encode(), _host().encode())
    )
    key = hashlib.sha256(text).hexdigest()[:16]
    target = cache_dir() / f"paged_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SPLITWISER_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if platform.system() != "Linux" or compiler is None:
            raise RuntimeError(f"needs Linux and a C compiler ({platform.system()}, {compiler})")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("splitwiser: CPU paged decode kernel unavailable, gathering instead: %s",
                    " ".join(str(detail).split())[:300])  # fmt: skip
        return None
    fn = lib.splitwiser_paged_decode_f32
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float]
    return lib


def available() -> bool:
    """Whether the kernel is built and loaded in this process (builds it on first call)."""
    return _library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The kernel's case: float32 on the CPU, the pool's blocks contiguous."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_cache.dtype == torch.float32
        and k_cache.is_contiguous()
        and available()
    )


def paged_decode(
    q: torch.Tensor,  # [T, heads, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D], one layer's keys
    v_cache: torch.Tensor,  # same, its values
    block_table: torch.Tensor,  # [T, max_blocks] int32
    context_lens: torch.Tensor,  # [T] int32
    scale: float,
    max_context_len: int | None = None,  # unused: the kernel reads each request's length
) -> torch.Tensor:
    """Each query token over its request's first ``context_lens[i]`` keys, read in place:
    ``softmax(q k^T * scale) v`` -> [T, heads, D]."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    q = q.contiguous()
    table = block_table.to(torch.int32)
    if table.stride(1) != 1:
        table = table.contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    rc = _library().splitwiser_paged_decode_f32(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(), table.stride(0),
        table.shape[1], lens.data_ptr(), out.data_ptr(), num_tokens, num_heads, num_kv_heads,
        head_dim, block_size, scale,
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"paged decode kernel: {_ERRORS.get(rc, rc)}")
    return out
