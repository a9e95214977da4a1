"""The Llama family (Llama incl. Llama-3 RoPE scaling and tied embeddings, Mistral, Qwen2 with
its q/k/v bias) on a flat batch of tokens, built around a loaded Hugging Face model's own weight
tensors: nothing is copied, so the weights still exist once and every worker maps them.

The arithmetic follows the Hugging Face modules operation for operation (the RMSNorm's float32
upcast, RoPE's ``q * cos + rotate_half(q) * sin``, the residual order), so greedy float32 tokens
equal ``generate()``'s; the projections' matmul is ``linear.linear_for``'s (oneDNN on the CPU).
Projections are not merged: merging would change the weights' layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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

log = logging.getLogger("splitwiser")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [T, heads, D] with cos/sin [T, 1, D] (Hugging Face's rotate_half form)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def fused(fn, examples):
    """``fn`` compiled into one kernel (CUDA: a decode step is hundreds of small kernels, and
    RMSNorm and RoPE are seven and five of them); ``fn`` itself where compiling fails.

    ``examples(num_tokens)`` builds arguments as ``forward`` passes them; every compile happens
    here, none in serving. Every size is dynamic, the token count too, but dynamo specializes a
    size of 1: one token (a decode batch of one) is compiled apart. The calls run under
    inference mode on inference tensors, as ``forward``'s do: grad mode and the tensors'
    dispatch keys are guarded, and a warm-up outside inference mode made the first forward
    compile both functions again."""
    try:
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        with torch.inference_mode():
            for num_tokens in (3, 1):
                compiled(*examples(num_tokens))
        return compiled
    except Exception as exc:  # an inductor or Triton that cannot build here: stay eager
        log.warning("splitwiser: %s stays unfused: %s", fn.__name__, str(exc).splitlines()[0])
        return fn


@dataclass
class _Layer:
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class LlamaModel:
    """``forward(input_ids [T], positions [T], meta) -> hidden [T, hidden]``;
    ``logits(hidden [N, hidden]) -> [N, vocab]`` float32."""

    def __init__(self, hf_model: torch.nn.Module, max_positions: int, fuse: bool = False):
        cfg = hf_model.config
        shape = ModelShape.from_hf(cfg)
        base = hf_model.model
        self.num_heads, self.num_kv_heads = shape.num_heads, shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.scale = self.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.weight
        self.lm_head = hf_model.lm_head.weight  # the embedding itself when tied
        self.act = base.layers[0].mlp.act_fn
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                a.q_proj.bias, a.k_proj.bias, a.v_proj.bias, a.o_proj.weight,
                layer.post_attention_layernorm.weight,
                m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
            ))  # fmt: skip
        # cos/sin of every position, from the model's own rotary module (any RoPE scaling):
        # each entry is computed exactly as the module computes it per forward pass
        device, dtype = self.embed.device, self.embed.dtype
        positions = torch.arange(max_positions, device=device)[None]
        cos, sin = base.rotary_emb(torch.empty((), device=device, dtype=dtype), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_positions, head_dim]
        self.rms_norm, self.rotate = rms_norm, rotate
        self.linear = linear_for(self.embed)
        if fuse:
            self.rms_norm = fused(rms_norm, self._norm_args)
            self.rotate = fused(rotate, self._rope_args)

    def _norm_args(self, num_tokens: int) -> tuple:
        like = dict(device=self.embed.device, dtype=self.embed.dtype)
        return torch.randn((num_tokens, self.embed.shape[1]), **like), self.norm, self.eps

    def _rope_args(self, num_tokens: int) -> tuple:
        like = dict(device=self.embed.device, dtype=self.embed.dtype)
        q = torch.randn((num_tokens, self.num_heads, self.head_dim), **like)
        positions = torch.arange(num_tokens, device=self.embed.device)
        return q, self.cos[positions][:, None], self.sin[positions][:, None]  # as forward's

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens, linear = input_ids.shape[0], self.linear
        h = F.embedding(input_ids, self.embed)  # [T, hidden]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [T, 1, D]
        for i, w in enumerate(self.layers):
            x = self.rms_norm(h, w.input_norm, self.eps)
            q = linear(x, w.q, w.q_bias).view(num_tokens, self.num_heads, self.head_dim)
            k = linear(x, w.k, w.k_bias).view(num_tokens, self.num_kv_heads, self.head_dim)
            v = linear(x, w.v, w.v_bias).view(num_tokens, self.num_kv_heads, self.head_dim)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            write_kv(meta, i, k, v)
            if meta.is_prefill:
                attn = prefill_attention(q, k, v, meta, self.scale)
            else:
                attn = decode_attention(q, meta, i, self.scale)
            h = h + linear(attn.reshape(num_tokens, -1), w.o)
            x = self.rms_norm(h, w.post_norm, self.eps)
            h = h + linear(self.act(linear(x, w.gate)) * linear(x, w.up), w.down)
        return self.rms_norm(h, self.norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden, self.lm_head).float()
