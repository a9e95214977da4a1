"""A model's shape, read off its Hugging Face config once: what the pool, the workers, the
baselines and the vLLM systems need to agree on (context length, KV heads, head_dim, vocab)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitwiser.errors import ConfigError

DEFAULT_CONTEXT_LEN = 2048  # a config that names no max_position_embeddings


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    # Mistral's sliding attention window, or None: the paged attention attends over the whole
    # context, so a request is capped at the window (every token sees every earlier one)
    sliding_window: int | None

    @classmethod
    def from_hf(cls, config) -> ModelShape:
        num_heads = config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        if not (window and getattr(config, "use_sliding_window", True)):
            window = None
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_position_embeddings=getattr(config, "max_position_embeddings", None)
            or DEFAULT_CONTEXT_LEN,
            sliding_window=None if window is None else int(window),
        )

    @property
    def context_len(self) -> int:
        """The longest request (prompt + output tokens) the model serves exactly."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    def max_model_len(self, requested: int | None = None) -> int:
        """``requested`` (``None``: the model's own) capped at ``context_len``."""
        if requested is not None and requested < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {requested!r}")
        return min(requested or self.context_len, self.context_len)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token over every layer, in bytes."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype.itemsize
