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

import torch
import torch.nn.functional as F

log = logging.getLogger("splitwiser")


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
