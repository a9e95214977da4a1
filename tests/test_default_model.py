"""The embedded default model and the random presets: built offline, deterministic, real shapes."""

from __future__ import annotations

import hashlib
import os
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


HUB_SCRIPT = """
import json, sys
from splitwiser import ModelNotFoundError, SamplingParams, SplitwiserPipeline
params = SamplingParams(max_new_tokens=6)
out = {}
for spec in ("splitwiser-test/tiny-llama", sys.argv[1]):
    with SplitwiserPipeline(spec, device="cpu") as pipe:
        out[spec] = pipe.generate([[5, 6, 7, 8]], params)[0].token_ids
try:
    SplitwiserPipeline("splitwiser-test/not-in-the-cache", device="cpu")
except ModelNotFoundError as exc:
    out["missing"] = str(exc)
print(json.dumps(out))
"""


def test_hub_id_loads_offline_from_the_local_cache(tmp_path):
    """A hub id resolves from the Hugging Face cache with no network (HF_HUB_OFFLINE=1)."""
    import json
    import shutil

    from tests.conftest import build_model_dir

    source = build_model_dir(tmp_path / "source", "llama")
    repo = tmp_path / "hf" / "hub" / "models--splitwiser-test--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, source], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["splitwiser-test/tiny-llama"] == out[source] and len(out[source]) == 6
    assert "cannot load model 'splitwiser-test/not-in-the-cache'" in out["missing"]


NO_SEMAPHORE = """
import multiprocessing, multiprocessing.synchronize as mps_sync, sys
import splitwiser  # sets the start method the runtime uses
made = []
init = mps_sync.SemLock.__init__
mps_sync.SemLock.__init__ = lambda self, *a, **k: (made.append(a), init(self, *a, **k))[1]
from splitwiser.models import default
default.ensure_default_model()
print("semaphores", len(made), multiprocessing.get_start_method())
"""


def test_building_the_default_model_makes_no_named_semaphore(tmp_path):
    """A progress bar's first use makes tqdm create a multiprocessing lock: under the spawn or
    forkserver start method (Python 3.14's default on Linux) a named semaphore in /dev/shm that
    outlives a short-lived process until its resource tracker removes it, so a command that
    builds the model would seem to leak one. The build shows no bar and makes no lock."""
    env = os.environ | {"SPLITWISER_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", NO_SEMAPHORE], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "semaphores 0" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / default.default_model_dir().name / "config.json").exists()
