"""``random:<preset>`` models: real architectures' shapes, random weights (for timing)."""

from __future__ import annotations

from transformers import LlamaConfig, OPTConfig, PretrainedConfig, Qwen2Config


def _opt_125m() -> PretrainedConfig:
    return OPTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        ffn_dim=3072,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=768,
        do_layer_norm_before=True,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )


def _qwen2_0_5b() -> PretrainedConfig:
    return Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}


def _llama_3_2_1b() -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters=dict(_LLAMA3_ROPE),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )


def _llama_3_8b() -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )


PRESETS = {
    "opt-125m": _opt_125m,
    "qwen2-0.5b": _qwen2_0_5b,
    "llama-3.2-1b": _llama_3_2_1b,
    "llama-3-8b": _llama_3_8b,
}


def preset_config(name: str) -> PretrainedConfig:
    """The config of ``random:<name>``; raises ``KeyError`` for an unknown preset."""
    return PRESETS[name.lower()]()
