"""Which front-end runs a model: Splitwiser's own model code for the Llama family and OPT, or
the checkpoint's Hugging Face modules with the same paged attention plugged in through
``AttentionInterface``. One attention implementation, two front-ends."""

from __future__ import annotations

import torch

from splitwiser.config import MODEL_IMPLS
from splitwiser.errors import ConfigError
from splitwiser.layers.attention import AttentionMetadata
from splitwiser.layers.attention.hf import ATTN_IMPLEMENTATION
from splitwiser.models.llama import LlamaModel
from splitwiser.models.opt import OPTModel

NATIVE_MODELS = {"llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel, "opt": OPTModel}


def resolve_model_impl(config, requested: str = "auto") -> str:
    """``splitwiser`` (own model code) or ``transformers`` for a model config."""
    native = config.model_type in NATIVE_MODELS
    if requested == "auto":
        return "splitwiser" if native else "transformers"
    if requested == "splitwiser" and not native:
        raise ConfigError(
            f"model_impl='splitwiser' supports {', '.join(sorted(NATIVE_MODELS))}, not "
            f"{config.model_type!r}; use model_impl='auto' or 'transformers'"
        )
    if requested not in MODEL_IMPLS:
        raise ConfigError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}, got {requested!r}")
    return requested


class TransformersModel:
    """A Hugging Face model's own modules on the packed batch ``[1, num_tokens]``: the same
    ``forward``/``logits`` contract as the native models (eager only: no CUDA graphs)."""

    def __init__(self, hf_model: torch.nn.Module):
        hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.base = hf_model.base_model
        self.head = hf_model.get_output_embeddings()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        out = self.base(
            input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
            attn_metadata=meta,
        )  # fmt: skip
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()


def build_model(hf_model: torch.nn.Module, impl: str, max_positions: int, fuse: bool = False):
    """The front-end ``impl`` around ``hf_model``'s weights. The Llama family's own code
    precomputes RoPE for ``max_positions`` positions, and with ``fuse`` compiles its small
    elementwise steps into single kernels (CUDA); OPT and the Hugging Face modules need neither."""
    hf_model.eval().requires_grad_(False)
    if impl != "splitwiser":
        return TransformersModel(hf_model)
    if NATIVE_MODELS[hf_model.config.model_type] is OPTModel:
        return OPTModel(hf_model)
    return LlamaModel(hf_model, max_positions, fuse)
