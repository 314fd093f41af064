"""Where sgdiff keeps what it computes once and reuses across processes (compiled graphs, tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The user's cache dir (XDG_CACHE_HOME, else ~/.cache) / sgdiff."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sgdiff"
