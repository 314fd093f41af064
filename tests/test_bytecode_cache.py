"""Where Python keeps no bytecode beside a library (PYTHONDONTWRITEBYTECODE, read-only site-packages), the
`sgdiff` command keeps it in sgdiff's cache: the first process writes it there, the next reads it, and
nothing is written beside the library. Checked with a stand-in package in fresh interpreters
(`python -v` says which `.pyc` each import reads)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing

from sgdiff.bytecode import shared_with_children

IMPORT_HEAVY = """
import sys
from sgdiff.bytecode import use_bytecode_cache
print(use_bytecode_cache("heavy_library"))
import heavy_library.part
"""


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A package with no bytecode beside it: heavy_library/{__init__,part}.py."""
    package = tmp_path / "site" / "heavy_library"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "part.py").write_text("from heavy_library import VALUE\nDOUBLE = 2 * VALUE\n")
    return package


def run(library: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": f"{library.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   "XDG_CACHE_HOME": str(cache), "PYTHONDONTWRITEBYTECODE": "1", **env}  # fmt: skip
    environment.pop("PYTHONPYCACHEPREFIX", None)
    done = subprocess.run([sys.executable, "-v", "-c", IMPORT_HEAVY], capture_output=True, text=True,
                          env=environment, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def bytecode_read(done: subprocess.CompletedProcess, source: Path) -> list[str]:
    """The `.pyc` files the process read for `source` (python -v: "# <pyc> matches <source>")."""
    return [line.split()[1] for line in done.stderr.splitlines()
            if line.startswith("# ") and line.endswith(f"matches {source}")]  # fmt: skip


def test_the_first_process_writes_the_cache_and_the_next_reads_it(library, tmp_path):
    cache = tmp_path / "cache"
    first = run(library, cache)
    folder = cache / "sgdiff" / "bytecode"
    assert first.stdout.strip() == str(folder)
    assert bytecode_read(first, library / "part.py") == []  # compiled from source this time
    written = {Path(p).name.split(".")[0] for p in map(str, folder.rglob("*.pyc")) if "heavy_library" in p}
    assert written == {"__init__", "part"}
    assert not (library / "__pycache__").exists()  # nothing beside the library's sources

    second = run(library, cache)
    read = bytecode_read(second, library / "part.py")
    assert len(read) == 1 and read[0].startswith(str(folder))


def test_a_library_with_its_own_bytecode_is_left_alone(library, tmp_path):
    for source in library.glob("*.py"):
        compiled = Path(importlib.util.cache_from_source(str(source)))
        compiled.parent.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "py_compile", str(source)], check=True)
        assert compiled.exists()
    done = run(library, tmp_path / "cache")
    assert done.stdout.strip() == "None"
    assert not (tmp_path / "cache").exists()
    assert bytecode_read(done, library / "part.py") == [str(importlib.util.cache_from_source(str(library / "part.py")))]


def test_the_off_switch_leaves_pythons_choice(library, tmp_path):
    done = run(library, tmp_path / "cache", SGDIFF_BYTECODE_CACHE="0")
    assert done.stdout.strip() == "None"
    assert not (tmp_path / "cache").exists() and not (library / "__pycache__").exists()


def prefix_of_child(answers) -> None:
    answers.put(sys.pycache_prefix)


@pytest.mark.slow
def test_spawned_workers_read_the_same_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "bytecode"))
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    context = torch.multiprocessing.get_context("spawn")
    answers = context.Queue()
    with shared_with_children():
        worker = context.Process(target=prefix_of_child, args=(answers,))
        worker.start()
    assert "PYTHONPYCACHEPREFIX" not in os.environ  # set for the start alone
    assert answers.get(timeout=60) == str(tmp_path / "bytecode")
    worker.join(timeout=60)
