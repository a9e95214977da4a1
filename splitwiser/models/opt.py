"""OPT (Splitwiser's own OPT-125m and its family) on a flat batch of tokens, around a loaded
Hugging Face model's weight tensors (no copy). Follows the Hugging Face modules' arithmetic:
learned positions offset by 2, the query scaled before attention, pre- or post-layer norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitwiser.layers.attention import (
    AttentionMetadata,
    decode_attention,
    prefill_attention,
    write_kv,
)
from splitwiser.layers.linear import linear_for
from splitwiser.models.shape import ModelShape

_POSITION_OFFSET = 2  # OPT's learned positions start at index 2


def _linear(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    return None if module is None else (module.weight, module.bias)


def _layer_norm(x: torch.Tensor, ln) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class OPTModel:
    """``forward(input_ids [T], positions [T], meta) -> hidden [T, hidden]``;
    ``logits(hidden [N, hidden]) -> [N, vocab]`` float32. Learned positions: no table to
    precompute, and nothing to fuse."""

    def __init__(self, hf_model: torch.nn.Module):
        shape = ModelShape.from_hf(hf_model.config)
        dec = hf_model.model.decoder
        self.num_heads, self.head_dim = shape.num_heads, shape.head_dim
        self.scaling = self.head_dim**-0.5
        self.pre_norm = hf_model.config.do_layer_norm_before
        self.embed = dec.embed_tokens.weight
        self.positions = dec.embed_positions.weight
        self.project_in = _linear(dec.project_in)
        self.project_out = _linear(dec.project_out)
        self.final_norm = dec.final_layer_norm
        self.layers = dec.layers  # modules kept for their weights and layer norms
        self.lm_head = hf_model.lm_head.weight
        self.linear = linear_for(self.embed)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens, linear = input_ids.shape[0], self.linear
        h = F.embedding(input_ids, self.embed)
        if self.project_in is not None:
            h = linear(h, *self.project_in)
        h = h + F.embedding(positions + _POSITION_OFFSET, self.positions)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = _layer_norm(h, layer.self_attn_layer_norm) if self.pre_norm else h
            q = (linear(x, a.q_proj.weight, a.q_proj.bias) * self.scaling).view(
                num_tokens, self.num_heads, self.head_dim
            )
            k = linear(x, a.k_proj.weight, a.k_proj.bias).view(num_tokens, self.num_heads, -1)
            v = linear(x, a.v_proj.weight, a.v_proj.bias).view(num_tokens, self.num_heads, -1)
            write_kv(meta, i, k, v)
            if meta.is_prefill:
                attn = prefill_attention(q, k, v, meta, 1.0)
            else:
                attn = decode_attention(q, meta, i, 1.0)
            h = h + linear(attn.reshape(num_tokens, -1), a.out_proj.weight, a.out_proj.bias)
            if not self.pre_norm:
                h = _layer_norm(h, layer.self_attn_layer_norm)
            x = _layer_norm(h, layer.final_layer_norm) if self.pre_norm else h
            x = layer.activation_fn(linear(x, layer.fc1.weight, layer.fc1.bias))
            h = h + linear(x, layer.fc2.weight, layer.fc2.bias)
            if not self.pre_norm:
                h = _layer_norm(h, layer.final_layer_norm)
        if self.final_norm is not None:
            h = _layer_norm(h, self.final_norm)
        if self.project_out is not None:
            h = linear(h, *self.project_out)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden, self.lm_head).float()
