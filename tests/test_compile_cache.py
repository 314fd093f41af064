"""torch.compile's work is kept on disk (the user's cache dir): with `--torch-compile-mode just-in-time` a
second `sgdiff generate` loads the compiled graphs the first one made, counted by torch's own cache counters
in the perf dump; another shape, dtype or sgdiff version compiles anew (the default mode, blocks compiled
ahead: tests/test_precompile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# sgdiff's CLI; `version` stands in for another release (the cache folder is keyed by it)
CODE = "import sys, sgdiff; sgdiff.__version__ = sys.argv.pop(1); from sgdiff.cli.main import main; main()"


def compile_cache_use(model: Path, tmp_path: Path, *flags: str, version: str = "test") -> dict:
    perf = tmp_path / "perf.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    command = [sys.executable, "-c", CODE, version, "generate", "--model-path", str(model), "--prompt", "a red cube",
               "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64", "--enable-torch-compile",
               "--torch-compile-mode", "just-in-time", "--output-path", str(tmp_path / "out"), "--perf-dump-path",
               str(perf), "--quiet", *flags]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(perf.read_text())["speed"]["torch_compile_cache"]


@pytest.mark.slow
def test_a_second_process_loads_what_the_first_compiled(tiny_flux_dev, tmp_path):
    first = compile_cache_use(tiny_flux_dev, tmp_path)
    assert first["graph_cache_misses"] > 0 and first["graph_cache_hits"] == 0
    assert Path(first["cache_dir"]).is_relative_to(tmp_path / "cache" / "sgdiff" / "torch-compile")
    second = compile_cache_use(tiny_flux_dev, tmp_path)
    assert second["graph_cache_misses"] == 0 and second["graph_cache_hits"] == first["graph_cache_misses"]
    assert second["cache_dir"] == first["cache_dir"]
    for flags, version in ((["--height", "96"], "test"), ([], "other")):  # another shape; another sgdiff
        changed = compile_cache_use(tiny_flux_dev, tmp_path, *flags, version=version)
        assert changed["graph_cache_misses"] > 0, (flags, version, changed)
    assert "other" in Path(changed["cache_dir"]).name
