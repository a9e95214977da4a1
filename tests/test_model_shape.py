"""``ModelShape.from_hf``: the facts the pool, the workers and the baselines agree on, read off
real transformers config classes (no weights): KV heads, head_dim, the context a sliding
window caps, and the KV bytes of one token."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from splitwiser import ConfigError
from splitwiser.models.presets import PRESETS
from splitwiser.models.shape import ModelShape


def test_llama_gqa_with_its_own_head_dim():
    # head_dim given explicitly, not hidden_size // heads (= 32 here)
    cfg = LlamaConfig(hidden_size=1024, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, num_hidden_layers=4, max_position_embeddings=8192)  # fmt: skip
    shape = ModelShape.from_hf(cfg)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (32, 8, 128)
    assert shape.context_len == shape.max_model_len() == 8192
    assert shape.kv_bytes_per_token(torch.bfloat16) == 4 * 2 * 8 * 128 * 2


def test_head_dim_missing_or_none_is_hidden_over_heads():
    cfg = MistralConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2)
    cfg.head_dim = None  # as some checkpoints' config.json write it
    assert ModelShape.from_hf(cfg).head_dim == 64


def test_opt_has_one_kv_head_per_query_head():
    cfg = OPTConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, ffn_dim=3072,
                    max_position_embeddings=2048)  # fmt: skip
    shape = ModelShape.from_hf(cfg)
    assert (shape.model_type, shape.num_kv_heads, shape.head_dim) == ("opt", 12, 64)
    assert shape.sliding_window is None and shape.context_len == 2048
    # 12 layers x (K, V) x 12 heads x 64 x 4 bytes
    assert shape.kv_bytes_per_token(torch.float32) == 12 * 2 * 12 * 64 * 4 == 73_728


def test_mistral_sliding_window_caps_the_context():
    cfg = MistralConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                        num_hidden_layers=32, max_position_embeddings=32768,
                        sliding_window=4096)  # fmt: skip
    shape = ModelShape.from_hf(cfg)
    assert shape.sliding_window == 4096 and shape.max_position_embeddings == 32768
    assert shape.context_len == 4096
    assert shape.max_model_len() == shape.max_model_len(100_000) == 4096
    assert shape.max_model_len(1000) == 1000  # a smaller request is kept
    with pytest.raises(ConfigError, match=">= 2"):
        shape.max_model_len(1)
    full = ModelShape.from_hf(MistralConfig(max_position_embeddings=32768, sliding_window=None))
    assert full.sliding_window is None and full.context_len == 32768


@pytest.mark.parametrize("use_sliding_window, window", [(False, None), (True, 4096)])
def test_qwen2_window_counts_only_when_used(use_sliding_window, window):
    cfg = Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                      num_hidden_layers=24, max_position_embeddings=32768, sliding_window=4096,
                      use_sliding_window=use_sliding_window)  # fmt: skip
    shape = ModelShape.from_hf(cfg)
    assert (shape.num_kv_heads, shape.head_dim) == (2, 64)
    assert shape.sliding_window == window and shape.context_len == (window or 32768)
    assert shape.kv_bytes_per_token(torch.float16) == 24 * 2 * 2 * 64 * 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_their_config(name):
    cfg = PRESETS[name]()
    shape = ModelShape.from_hf(cfg)
    assert shape.num_layers == cfg.num_hidden_layers and shape.vocab_size == cfg.vocab_size
    assert shape.num_heads % shape.num_kv_heads == 0  # every KV head serves whole query groups
    assert shape.num_heads * shape.head_dim == cfg.hidden_size
