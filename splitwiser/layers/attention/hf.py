"""The same paged attention for any other Hugging Face architecture: ``hf_attention_forward`` is
registered with transformers' ``AttentionInterface`` as ``ATTN_IMPLEMENTATION`` when this module
is imported, and a model switched to it (``set_attn_implementation``) runs its own modules on the
packed batch with Splitwiser's metadata passed through its forward."""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from splitwiser.layers.attention import (
    AttentionMetadata,
    decode_attention,
    prefill_attention,
    write_kv,
)

ATTN_IMPLEMENTATION = "splitwiser_paged"


def hf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, num_tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_metadata: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The same attention for a Hugging Face model's own modules (``AttentionInterface``): its
    forward runs on the packed batch ``[1, num_tokens]`` with ``attn_metadata`` passed through."""
    meta = attn_metadata
    if meta is None:
        raise RuntimeError("splitwiser paged attention called without attention metadata")
    scale = module.head_dim**-0.5 if scaling is None else scaling
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, h, D]
    write_kv(meta, module.layer_idx, k, v)
    if meta.is_prefill:
        out = prefill_attention(q, k, v, meta, scale)
    else:
        out = decode_attention(q, meta, module.layer_idx, scale)
    return out[None], None  # [1, num_tokens, heads, head_dim]


AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention_forward)
