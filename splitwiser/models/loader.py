"""Resolve a model spec (None, ``random:<preset>``, directory, hub id) to model and tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from splitwiser.errors import ModelNotFoundError
from splitwiser.models.default import build_tokenizer, ensure_default_model
from splitwiser.models.presets import PRESETS, preset_config

RANDOM_PREFIX = "random:"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # eval mode, on the target device and dtype
    tokenizer: object  # a transformers tokenizer
    name: str  # what the user asked for, as shown in results
    source: str  # where it came from (a directory, "random preset", ...)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec and os.path.exists(spec)


def load_model(spec: str | None, *, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load once in the calling process; workers later map these tensors instead of reloading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if spec is None:
        path = str(ensure_default_model())
        name, source = "default", path
    elif spec.startswith(RANDOM_PREFIX):
        preset = spec[len(RANDOM_PREFIX) :]
        if preset.lower() not in PRESETS:
            raise ModelNotFoundError(
                f"unknown random preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}"
            )
        config = preset_config(preset)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return LoadedModel(model.eval(), build_tokenizer(), spec, "random preset")
    else:
        path = os.path.expanduser(spec)
        if _looks_like_path(spec) and not os.path.isdir(path):
            raise ModelNotFoundError(
                f"model directory {spec!r} does not exist; pass a Hugging Face causal-LM "
                f"directory, a hub id, 'random:<preset>' or no model for the embedded default"
            )
        name, source = spec, path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None)
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load model {spec!r}: {str(exc).splitlines()[0]} (a local directory, a hub id "
            f"in the local cache, 'random:<preset>', or no model for the embedded default)"
        ) from exc
    return LoadedModel(model.to(device).eval(), tokenizer, name, source)
