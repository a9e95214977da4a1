"""The embedded default model: a small random-weight Llama (GQA) with a real BPE tokenizer.

Built deterministically on first use from text shipped in the package and cached under
``$SPLITWISER_CACHE`` (default ``~/.cache/splitwiser``). No download ever happens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from filelock import FileLock

from splitwiser.cache import cache_root

DEFAULT_MODEL_VERSION = "v1"
# NOTE: bump DEFAULT_MODEL_VERSION when anything below changes: the cache is keyed on it.
_VOCAB_SIZE = 2048
_SEED = 0
EOS_TOKEN = "<|endoftext|>"


def default_model_dir() -> Path:
    return cache_root() / f"default-llama-{DEFAULT_MODEL_VERSION}"


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the shipped corpus (deterministic, ~0.1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("splitwiser.models").joinpath("corpus.txt").read_text("utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def default_config(vocab_size: int, eos_token_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        # NOTE: a wider init than real models' 0.02 spreads the random logits, so greedy
        # decoding is decisive (no near-ties) and the generated text is less degenerate.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def _build(target: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    tokenizer = build_tokenizer()
    config = default_config(len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    # NOTE: no progress bar: tqdm's first bar creates a multiprocessing lock, which under the
    # spawn or forkserver start method is a named semaphore in /dev/shm that outlives the
    # process until its resource tracker removes it (a leak seen from outside)
    had_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        if had_bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_default_model() -> Path:
    """The default model's directory, built on first use (safe against concurrent builders)."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _build(target)
    return target
