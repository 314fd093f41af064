"""Load the library-provided parts of a diffusers checkpoint (safetensors only)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sgdiff.errors import UserError
from sgdiff.models.loading import safetensors_files
from sgdiff.pipeline.base import PipelineEvents


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers'/diffusers' progress bars and advice while sgdiff draws its own progress."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, before, strict=True):
            lib.set_verbosity(verbosity)
            if bars:  # as the caller had it
                lib.enable_progress_bar()


def require_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: the checkpoint has no {folder.name}/ folder")
    return folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    with quiet_libraries():
        return AutoTokenizer.from_pretrained(require_folder(folder))


def load_library_model(cls, folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A transformers or diffusers model (text encoder, VAE) from its folder; pickle-only weights are refused."""
    safetensors_files(require_folder(folder))
    with quiet_libraries():
        model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def timed_load(events: PipelineEvents, name: str, load: Callable[[], Any]) -> Any:
    """Run `load()`, reporting it as the stage 'load <name>' (the CLI shows one line per part)."""
    events.stage_started(f"load {name}")
    start = time.perf_counter()
    part = load()
    events.stage_finished(f"load {name}", time.perf_counter() - start)
    return part


def timed_load_unless_skipped(events: PipelineEvents, skip: frozenset[str], name: str, load: Callable[[], Any]) -> Any:
    """timed_load, or None when `name` is one of the components this process does not load."""
    return None if name in skip else timed_load(events, name, load)


def loaded_modules(parts: Any) -> tuple[str, ...]:
    """The names of a components dataclass's fields that hold a loaded model."""
    from dataclasses import fields

    return tuple(f.name for f in fields(parts) if isinstance(getattr(parts, f.name), torch.nn.Module))
