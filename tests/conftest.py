"""Shared fixtures: small real Hugging Face models built on the spot (no download), and
helpers that snapshot what a pipeline could leave behind (processes, /dev/shm segments)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psutil
import pytest
import torch

from splitwiser.models.default import build_tokenizer
from splitwiser.runtime import spawn

ARCHS = ("llama", "qwen2", "mistral", "opt")


def _config(arch: str, vocab_size: int, eos: int, init: float, hidden: int, layers: int):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    # GQA: 4 query heads share 2 key/value heads
    decoder = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init,
        **common,
    )
    if arch == "llama":
        return LlamaConfig(**decoder)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **decoder)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **decoder)
    if arch == "opt":
        return OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            init_std=init,
            **common,
        )
    raise ValueError(arch)


def build_model_dir(
    path,
    arch: str,
    *,
    init: float = 0.02,
    hidden: int = 64,
    layers: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
) -> str:
    """Save a random-weight model of ``arch`` with the embedded tokenizer into ``path``."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    vocab = vocab_size or len(tokenizer)
    config = _config(arch, vocab, tokenizer.eos_token_id, init, hidden, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    return {a: build_model_dir(tmp_path_factory.mktemp(a), a) for a in ARCHS}


@pytest.fixture(scope="session")
def reference_models(model_dirs):
    """The same models loaded in this process, for ``generate()`` references."""
    from transformers import AutoModelForCausalLM

    return {
        a: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for a, d in model_dirs.items()
    }


def hf_greedy(
    model, prompt_ids: list[int], max_new_tokens: int, eos: bool | list[int] = False,
    min_new_tokens: int = 0,
) -> list[int]:  # fmt: skip
    """The reference: ``generate(do_sample=False)`` on one prompt alone; ``eos`` True: the
    model's EOS ends it, a list: these ids do (and ``min_new_tokens`` masks them before)."""
    import copy

    gen = copy.deepcopy(model.generation_config)
    if not eos:
        gen.eos_token_id = []  # None would be refilled from the model's defaults
    elif eos is not True:
        gen.eos_token_id = list(eos)
    gen.min_new_tokens = min_new_tokens or None
    gen.max_new_tokens = max_new_tokens
    gen.do_sample = False
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out[0, len(prompt_ids) :].tolist()


EOS_PROMPT = [5, 9, 200, 31, 7, 64, 12]


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory):
    """A Llama whose EOS is the 6th token greedy decoding of EOS_PROMPT produces."""
    from transformers import AutoModelForCausalLM

    path = build_model_dir(tmp_path_factory.mktemp("eos"), "llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    free_run = hf_greedy(model, EOS_PROMPT, 12)
    eos = free_run[5]
    assert eos not in free_run[:5]
    model.generation_config.eos_token_id = eos
    model.config.eos_token_id = eos
    model.save_pretrained(path)
    return path, free_run, eos


@pytest.fixture(autouse=True)
def _sharded_gpu_kv_pool(monkeypatch):
    """bench/gpu_suite.py runs the CUDA tests in parallel processes: there each pipeline sized
    by default takes ``SPLITWISER_TEST_KV_CACHE_BYTES`` of KV pool on CUDA, not
    ``gpu_memory_utilization`` of the device, which only one pipeline at a time may take."""
    share = os.environ.get("SPLITWISER_TEST_KV_CACHE_BYTES")
    if not share:
        return
    from splitwiser.runtime import engine

    sized = engine.default_num_blocks

    def shared(layout, device, *args, **kwargs):
        if device.type != "cuda":
            return sized(layout, device, *args, **kwargs)
        return max(1, int(share) // layout.bytes_per_block)

    monkeypatch.setattr(engine, "default_num_blocks", shared)


class Leftovers:
    """What exists now, to compare with what exists after a pipeline is gone."""

    def __init__(self):
        self.children = self._children()
        self.shm = set(os.listdir("/dev/shm"))

    @staticmethod
    def _children() -> set[int]:
        out = set()
        # multiprocessing's resource tracker and fork server are per-interpreter singletons,
        # not workers (the fork server's children are)
        server = spawn.forkserver_pid()
        for p in psutil.Process().children(recursive=True):
            try:
                if p.pid != server and "resource_tracker" not in " ".join(p.cmdline()):
                    out.add(p.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def new_children(self) -> set[int]:
        return self._children() - self.children

    def new_shm(self) -> set[str]:
        new = set(os.listdir("/dev/shm")) - self.shm
        if torch.cuda.is_initialized():
            # torch's CUDA IPC reference-count file of this (still running) process: it lives
            # as long as the process that shared the tensors, by design
            new = {n for n in new if not n.startswith(f"torch_{os.getpid()}_")}
        return new

    def assert_clean(self) -> None:
        assert self.new_children() == set(), "worker processes left behind"
        assert self.new_shm() == set(), "shared-memory segments left behind"


@pytest.fixture
def leftovers() -> Leftovers:
    return Leftovers()


FAKES = str(Path(__file__).parent / "fakes")  # test doubles of NVIDIA's tools (see their heads)


@pytest.fixture
def fake_mps(monkeypatch, tmp_path):
    """The test doubles first on PATH, temp dirs and the MPS state file under tmp_path."""
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("SPLITWISER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp_path
