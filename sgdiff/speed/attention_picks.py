"""`--attention-backend auto`'s measured choices (speed/auto_attention.py) kept on disk, so that a later
process on the same GPU and software takes them without timing the kernels again, and, where cuDNN won,
without importing FlashAttention at all (FA4's import, the loading of its compiled kernels and the timing
took ~2.9 s of a Wan2.1 run's first step on an H100: docs/benchmarks.md, run GL).

One JSON file in the user's cache (~/.cache/sgdiff/attention-picks.json): {key: {"kernel": name, "ms": {name:
ms per call}}}. A key names the GPU, the versions of torch, cuDNN and the FlashAttention package, the
candidates, the shapes and the dtype: a change of any of them is measured afresh. A file that cannot be read
is as good as none, and one that cannot be written only costs the next process a measurement."""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch

from sgdiff.cache import cache_root
from sgdiff.errors import WriteFailed
from sgdiff.io.files import write_atomically

log = logging.getLogger(__name__)

Key = tuple  # a chooser's: (q shape, k shape, dtype, device)


class PickStore:
    """The picks of one GPU and software in `path`; `describe()`: what they depend on besides the shapes
    (asked at the first pick, not before: nothing of the GPU is queried until a kernel is chosen)."""

    def __init__(self, path: Path, describe: Callable[[], str]):
        self.path, self.describe = path, describe
        self._read: dict | None = None

    @cached_property
    def software(self) -> str:
        return self.describe()

    def entry(self, key: Key, candidates: list[str]) -> str:
        q_shape, k_shape, dtype, _ = key
        dtype_name = str(dtype).removeprefix("torch.")
        return f"{self.software} | {'/'.join(candidates)} | q {list(q_shape)} k {list(k_shape)} {dtype_name}"

    def get(self, key: Key, candidates: list[str]) -> tuple[str, dict[str, float]] | None:
        """(the kernel picked, the ms per call measured) at `key`, if a run before this one measured it."""
        found = self._picks().get(self.entry(key, candidates))
        if not isinstance(found, dict) or found.get("kernel") not in candidates:
            return None
        ms = found.get("ms")
        return found["kernel"], dict(ms) if isinstance(ms, dict) else {}

    def put(self, key: Key, candidates: list[str], kernel: str, ms: dict[str, float]) -> None:
        """Keep a pick, beside what other processes kept since this one read the file."""
        self._read = None  # read again: another process may have added its own
        picks = {**self._picks(), self.entry(key, candidates): {"kernel": kernel, "ms": ms}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, lambda handle: handle.write(json.dumps(picks, indent=1).encode()))
        except (OSError, WriteFailed) as error:
            log.warning("attention: cannot keep auto's pick in %s (%s); the next run measures again", self.path, error)
        self._read = picks

    def _picks(self) -> dict:
        if self._read is None:
            try:
                read = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # none yet, unreadable, or not JSON: measured again
                read = {}
            self._read = read if isinstance(read, dict) else {}
        return self._read


def pick_store(device: torch.device, distribution: str) -> PickStore:
    """The store for this CUDA GPU, with `distribution` the package of the FlashAttention measured against cuDNN."""
    return PickStore(cache_root() / "attention-picks.json", lambda: software(device, distribution))


def software(device: torch.device, distribution: str) -> str:
    """The GPU and the versions a pick depends on."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # (a build from source may name itself otherwise)
        version = "unknown"
    return (
        f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | cudnn {torch.backends.cudnn.version()} | "
        f"{distribution} {version}"
    )
