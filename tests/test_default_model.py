"""The embedded default model and the random presets: built offline, deterministic, real shapes."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import torch

from splitwiser.models import default
from splitwiser.models.loader import load_model
from splitwiser.models.presets import PRESETS


def _digest(directory) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        h.update((directory / name).read_bytes())
    return h.hexdigest()


def test_default_model_is_deterministic_and_fits_trace_lengths(tmp_path, monkeypatch):
    digests = []
    for run in ("a", "b"):
        monkeypatch.setenv("SPLITWISER_CACHE", str(tmp_path / run))
        path = default.ensure_default_model()
        assert path.is_relative_to(tmp_path / run)
        digests.append(_digest(path))
    assert digests[0] == digests[1]  # same weights and vocabulary on every build
    loaded = load_model(None, dtype=torch.float32, device=torch.device("cpu"))
    cfg = loaded.model.config
    assert cfg.model_type == "llama" and cfg.max_position_embeddings >= 8192
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    ids = loaded.tokenizer("The capital of France is").input_ids
    assert 0 < len(ids) < len("The capital of France is")  # a real BPE, not bytes
    assert loaded.tokenizer.decode(ids) == "The capital of France is"


def test_model_info_command(tmp_path):
    env = {"SPLITWISER_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "splitwiser", "model", "info"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path) in proc.stdout and "llama" in proc.stdout


def test_random_presets_have_real_shapes():
    expected = {
        "opt-125m": ("opt", 768, 12),
        "qwen2-0.5b": ("qwen2", 896, 24),
        "llama-3.2-1b": ("llama", 2048, 16),
        "llama-3-8b": ("llama", 4096, 32),
    }
    assert set(PRESETS) == set(expected)
    for name, (arch, hidden, layers) in expected.items():
        loaded = load_model(f"random:{name}", dtype=torch.bfloat16, device=torch.device("meta"))
        cfg = loaded.model.config
        assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == (arch, hidden, layers)
    n = sum(
        p.numel()
        for p in load_model(
            "random:llama-3-8b", dtype=torch.bfloat16, device=torch.device("meta")
        ).model.parameters()
    )
    assert 7.9e9 < n < 8.1e9
