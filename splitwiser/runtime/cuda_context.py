"""Whether this process already holds a CUDA context, and joining the workers' MPS daemon
before it does: the parent allocates the weights and the pool that the workers map over CUDA
IPC, so it must be an MPS client of the same daemon."""

from __future__ import annotations

import ctypes
import os

import torch

from splitwiser.errors import ConfigError


def cuda_context_active() -> bool:
    """Whether anything in this process already holds a CUDA context (torch, or any other
    library: ``torch.cuda.is_initialized()`` knows only torch's own). A process that never
    loaded the driver library has none; otherwise the driver says whether a primary context is
    active or one is current."""
    try:
        with open("/proc/self/maps") as f:
            if "libcuda.so" not in f.read():
                return False
        cuda = ctypes.CDLL("libcuda.so.1")
        if cuda.cuInit(0) != 0:
            return False
        current = ctypes.c_void_p()
        if cuda.cuCtxGetCurrent(ctypes.byref(current)) == 0 and current.value:
            return True
        count = ctypes.c_int()
        cuda.cuDeviceGetCount(ctypes.byref(count))
        for i in range(count.value):
            dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
            cuda.cuDeviceGet(ctypes.byref(dev), i)
            cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
            if active.value:
                return True
        return False
    except OSError:  # no /proc or no driver library: fall back to torch's own view
        return torch.cuda.is_initialized()


def join_mps(pipe_dir: str) -> None:
    """This process allocates the weights and the pool that the workers map over CUDA IPC: it
    joins the workers' MPS daemon, which CUDA reads when it initialises. The variable stays set
    for the life of the process, as CUDA's connection does."""
    if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") == pipe_dir:
        return
    if cuda_context_active():
        raise ConfigError(
            "CUDA was initialised in this process before MPS was configured; create the pipeline "
            "with mps_pipe_dir before any CUDA work, or set CUDA_MPS_PIPE_DIRECTORY at start-up"
        )
    os.environ["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir
