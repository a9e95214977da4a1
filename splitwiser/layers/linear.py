"""The projections' matrix multiply.

On the CPU in float32, torch's oneDNN matmul (``mkldnn._linear_pointwise``, the kernel torch's
own CPU compiler emits for a linear layer) runs 1.6x MKL's sgemm at 32 rows and 2.2x at 4,096 on
an AVX-512 EPYC (``bench/README.md``), reading the weight in place: no packed copy, so the
weights still exist once. It is checked once against ``F.linear`` and used only where it
agrees; everywhere else (CUDA, other dtypes, a torch without it) ``F.linear`` runs.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("splitwiser")


# Entries per shape cache: the five projection shapes of a step (q, k/v, o, gate/up, down, head)
# at three batch sizes. Measured (CPU, embedded model, bench/soak.py): at 16 a token worker's
# private memory stays flat from the 500th request on; at 32 and 64 it still fills for a few
# thousand requests; at oneDNN's default of 1,024 it rose by 12-20% in 4,000 requests.
PRIMITIVE_CACHE_CAPACITY = 16


def bound_primitive_caches(capacity: int = PRIMITIVE_CACHE_CAPACITY) -> None:
    """Bound the caches oneDNN keeps per matmul shape, in this process, unless the user set them.

    oneDNN builds (JIT-compiles) a primitive for every new (rows, in, out) shape and keeps it in
    two caches, its own (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and ideep's, the wrapper torch
    calls it through (``LRU_CACHE_CAPACITY``), 1,024 entries each by default, about 0.6 MiB an
    entry. A server's batches take ever new row counts (each decode batch size, each prefill's
    token count), so with the defaults a worker's heap grows by hundreds of MiB before the caches
    fill. Both are read at the first primitive built: call this before the model runs. A miss
    costs about 0.2 ms (rebuilding one primitive), once per shape per step, not per layer.
    """
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(capacity))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def _onednn_works() -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=gen) for shape in ((5, 48), (40, 48), (40,)))
        got = _onednn_linear(x, w, b)
        return torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    except Exception as exc:  # a torch built without oneDNN, or an op renamed
        log.info("splitwiser: oneDNN linear unavailable (%s); using F.linear", exc)
        return False


def linear_for(weight: torch.Tensor):
    """The linear function for ``weight``'s device and dtype: ``fn(x, weight, bias=None)``."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_works():
        return _onednn_linear
    return F.linear
