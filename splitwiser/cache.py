"""Where Splitwiser keeps what it builds on first use (the default model, compiled kernels):
``$SPLITWISER_CACHE``, else ``splitwiser/`` under ``$XDG_CACHE_HOME`` (``~/.cache``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("SPLITWISER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "splitwiser"
