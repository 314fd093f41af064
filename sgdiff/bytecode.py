"""Compiled bytecode for the libraries the `sgdiff` command imports, kept in sgdiff's cache where Python keeps
none beside their sources.

Some Python installations hold no `.pyc` files for torch and write none: container images built with
PYTHONDONTWRITEBYTECODE=1, read-only site-packages. Every process then compiles torch's modules from
source again: `import torch` took 2.96 s instead of ~0.7 s on the GPU machine, and torch's compiler
~5 s more. Where torch has no bytecode beside its `__init__.py`, the `sgdiff` command points Python's
bytecode cache (`sys.pycache_prefix`) at the user's cache dir and lets it write there: the first process
writes the bytecode of what it imports, the next ones read it (Python checks each file's source size and
time, so an upgraded library is compiled again). Nothing is written beside the libraries' sources.
Worker processes read the same cache (pool.py passes the folder on). SGDIFF_BYTECODE_CACHE=0 leaves
Python's own choice alone."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sgdiff.cache import cache_root

OFF_SWITCH = "SGDIFF_BYTECODE_CACHE"
PREFIX_VARIABLE = "PYTHONPYCACHEPREFIX"


def use_bytecode_cache(probe: str = "torch") -> Path | None:
    """Make this process read and write bytecode under sgdiff's cache if `probe` (a package not yet
    imported) has no bytecode beside its source; the folder used, or None where nothing changed (bytecode
    found, the switch off, a prefix the user chose, or no such package)."""
    if os.environ.get(OFF_SWITCH, "1") == "0" or sys.pycache_prefix is not None or probe in sys.modules:
        return None
    spec = importlib.util.find_spec(probe)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    try:
        compiled = importlib.util.cache_from_source(spec.origin)
    except NotImplementedError:  # an interpreter without a bytecode cache tag
        return None
    if os.path.exists(compiled):
        return None
    folder = cache_root() / "bytecode"
    sys.pycache_prefix = str(folder)
    sys.dont_write_bytecode = False
    return folder


@contextmanager
def shared_with_children() -> Iterator[None]:
    """Interpreters started inside (spawned workers) read the bytecode cache this process uses: they take
    it from the environment (PYTHONPYCACHEPREFIX), which is set for the start alone, so that other programs
    this process runs keep their own choice."""
    if sys.pycache_prefix is None or PREFIX_VARIABLE in os.environ:
        yield
        return
    os.environ[PREFIX_VARIABLE] = sys.pycache_prefix
    try:
        yield
    finally:
        os.environ.pop(PREFIX_VARIABLE, None)
