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


def _resolve(spec: str | None) -> tuple[str | None, str, str]:
    """(directory or None for a random preset, name, source) of a model spec; raises if unknown."""
    if spec is None:
        path = str(ensure_default_model())
        return path, "default", path
    if spec.startswith(RANDOM_PREFIX):
        preset = spec[len(RANDOM_PREFIX) :]
        if preset.lower() not in PRESETS:
            raise ModelNotFoundError(
                f"unknown random preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}"
            )
        return None, spec, "random preset"
    path = os.path.expanduser(spec)
    if _looks_like_path(spec) and not os.path.isdir(path):
        raise ModelNotFoundError(
            f"model directory {spec!r} does not exist; pass a Hugging Face causal-LM "
            f"directory, a hub id, 'random:<preset>' or no model for the embedded default"
        )
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(
            f"model directory {spec!r} has no config.json: not a Hugging Face model folder "
            f"(save one with save_pretrained, or use 'random:<preset>' or the embedded default)"
        )
    return path, spec, path


# what transformers raises for a folder or hub id it cannot load: missing files (OSError), a
# config without a known model type or a tokenizer it cannot build (ValueError, KeyError)
_LOAD_ERRORS = (OSError, ValueError, KeyError)


def _not_found(spec: str, exc: Exception) -> ModelNotFoundError:
    reason = " ".join(str(exc).split())  # one line
    reason = reason if len(reason) <= 240 else reason[:237] + "..."
    return ModelNotFoundError(
        f"cannot load model {spec!r}: {reason} (a local directory, a hub id in the local cache, "
        f"'random:<preset>', or no model for the embedded default)"
    )


def load_tokenizer(spec: str | None):
    """The tokenizer of a model spec, without loading its weights."""
    from transformers import AutoTokenizer

    path, _, _ = _resolve(spec)
    if path is None:
        return build_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(path)
    except _LOAD_ERRORS as exc:
        raise _not_found(spec, exc) from exc


def load_model_config(spec: str | None):
    """The model's ``PretrainedConfig``, without loading its weights."""
    from transformers import AutoConfig

    path, _, _ = _resolve(spec)
    if path is None:
        return preset_config(spec[len(RANDOM_PREFIX) :])
    try:
        return AutoConfig.from_pretrained(path)
    except _LOAD_ERRORS as exc:
        raise _not_found(spec, exc) from exc


def load_model(spec: str | None, *, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load once in the calling process; workers later map these tensors instead of reloading."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path, name, source = _resolve(spec)
    if path is None:
        config = preset_config(spec[len(RANDOM_PREFIX) :])
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return LoadedModel(model.eval(), build_tokenizer(), name, source)
    tokenizer = load_tokenizer(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None)
    except _LOAD_ERRORS as exc:
        raise _not_found(spec, exc) from exc
    return LoadedModel(model.to(device).eval(), tokenizer, name, source)
