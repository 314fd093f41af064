"""Load the library-provided parts of a diffusers checkpoint (safetensors only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sgdiff.errors import UserError
from sgdiff.models.loading import safetensors_files


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers'/diffusers' progress bars and advice while sgdiff draws its own progress."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    for lib in (transformers_logging, diffusers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])
        for lib in (transformers_logging, diffusers_logging):
            lib.enable_progress_bar()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise UserError(f"{folder} is missing: the checkpoint has no {folder.name}/ folder")
    return AutoTokenizer.from_pretrained(folder)


def load_transformers_model(cls, folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A transformers model (text encoder) from its folder, refusing pickle-only weights."""
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: the checkpoint has no {folder.name}/ folder")
    safetensors_files(folder)
    with quiet_libraries():
        model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def load_diffusers_model(cls, folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A diffusers model (VAE) from its folder, refusing pickle-only weights."""
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: the checkpoint has no {folder.name}/ folder")
    safetensors_files(folder)
    with quiet_libraries():
        model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)
