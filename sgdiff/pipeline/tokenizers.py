"""Tokenizers without importing transformers on the way: a `tokenizer/` folder's tokenizer is built once
by transformers (as AutoTokenizer builds it), and what encoding needs of it (the `tokenizers` library's
Rust pipeline, serialized, with its padding settings) is kept in the user's cache. A later process
reads that file with the `tokenizers` library alone: about 0.05 s instead of transformers' import and
construction (0.7 s here; 3 to 5 s on the GPU machine while the weights load beside it, docs/benchmarks.md).

The cache key is the folder's files (names, sizes, modification times) and the versions of transformers
and tokenizers, so an edited tokenizer or another library version builds it again. Encoding is the
same Rust call transformers makes for its fast tokenizers: the same ids and masks (tests/test_tokenizers.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from sgdiff.cache import cache_root

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached file's fields change


@dataclass
class Encoded:
    """What a transformers tokenizer's __call__ returns, for the fields sgdiff reads."""

    input_ids: Any  # [B, L] tensor with return_tensors="pt", else one list of ids per text
    attention_mask: Any


class CachedTokenizer:
    """A transformers fast tokenizer's encoding, from its serialized Rust pipeline: called as
    transformers' tokenizers are (texts, padding="max_length", max_length, truncation, return_tensors)."""

    def __init__(self, backend, model_max_length: int, padding: dict[str, Any], truncation_side: str, name: str):
        self.backend = backend  # tokenizers.Tokenizer, with neither padding nor truncation set
        self.model_max_length = model_max_length
        self.padding = padding  # pad_id, pad_token, pad_type_id, direction
        self.truncation_side = truncation_side
        self.name = name  # the transformers class it stands for (in messages)

    def __call__(
        self,
        texts: list[str],
        padding: str | bool = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = None,
    ) -> Encoded:
        backend = self.backend
        if truncation:
            backend.enable_truncation(max_length or self.model_max_length, direction=self.truncation_side)
        else:
            backend.no_truncation()
        if padding == "max_length":
            backend.enable_padding(length=max_length or self.model_max_length, **self.padding)
        else:
            backend.no_padding()
        encodings = backend.encode_batch(texts, add_special_tokens=True)
        ids = [e.ids for e in encodings]
        mask = [e.attention_mask for e in encodings]
        if return_tensors == "pt":
            return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long))
        return Encoded(ids, mask)


def library_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def cache_key(folder: Path) -> str:
    """The folder's files and the libraries that build and run its tokenizer, hashed."""
    parts = [f"format {CACHE_FORMAT}", library_version("transformers"), library_version("tokenizers")]
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = path.stat()
        parts.append(f"{path.name} {stat.st_size} {stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cached_tokenizer_path(folder: Path) -> Path:
    return cache_root() / "tokenizers" / f"{cache_key(folder)}.json"


def read_cached(path: Path) -> CachedTokenizer | None:
    """The tokenizer kept at `path`, or None (absent, or unreadable: then it is built again)."""
    from tokenizers import Tokenizer

    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        backend = Tokenizer.from_str(kept["backend"])
        return CachedTokenizer(
            backend, kept["model_max_length"], kept["padding"], kept["truncation_side"], kept["class"]
        )
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a broken or foreign file in a cache is never fatal: built again
        log.debug("tokenizer cache %s not used: %s", path, exc)
        return None


def keep(path: Path, tokenizer) -> None:
    """Write what encoding needs of a transformers fast tokenizer to `path` (atomically; a cache that
    cannot be written is skipped)."""
    backend = tokenizer.backend_tokenizer
    kept = {
        "class": type(tokenizer).__name__,
        "model_max_length": int(min(tokenizer.model_max_length, 2**31 - 1)),
        "truncation_side": tokenizer.truncation_side,
        "padding": {
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            "pad_token": str(tokenizer.pad_token) if tokenizer.pad_token is not None else "[PAD]",
            "pad_type_id": tokenizer.pad_token_type_id,
            "direction": tokenizer.padding_side,
        },
    }
    # transformers sets padding and truncation on the backend per call; keep it without either
    backend_copy = type(backend).from_str(backend.to_str())
    backend_copy.no_padding()
    backend_copy.no_truncation()
    kept["backend"] = backend_copy.to_str()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(kept), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # (a full disk: no half-written file is left either)
        log.debug("tokenizer cache %s not written: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def is_fast(tokenizer) -> bool:
    return bool(getattr(tokenizer, "is_fast", False)) and hasattr(tokenizer, "backend_tokenizer")
