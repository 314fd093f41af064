"""`sgdiff generate` imports what its request needs and nothing else: a FLUX request no Wan code, a
Wan request no FLUX code, neither one the server, the benchmark, or torch.distributed's parallel
plans (one process); checked on sys.modules in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

GENERATE_AND_LIST = """
import json, sys
from sgdiff.cli.main import app  # main() would leave at once after a clean run, before the list is printed
sys.argv = ["sgdiff", "generate", *sys.argv[1:]]
try:
    app()
except SystemExit as exit:
    assert not exit.code, exit.code
print(json.dumps(sorted(sys.modules)))
"""
# (httpx is no sign: huggingface_hub, which transformers imports, uses it)
NEVER = ["sgdiff.server", "sgdiff.bench.run", "sgdiff.bench.end_to_end", "sgdiff.parallel", "sgdiff.engine.worker",
         "sgdiff.engine.pool", "sgdiff.cli.remote", "fastapi", "uvicorn", "starlette", "prometheus_client"]  # fmt: skip


def modules_of(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", GENERATE_AND_LIST, *args, "--device", "cpu", "--steps", "2", "-q"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def imported(modules: set[str], prefixes: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize(
    "model, other_family",
    [
        ("sgdiff/demo-image", ["sgdiff.families.wan.pipeline", "sgdiff.families.wan.shard", "sgdiff.models.wan"]),
        ("sgdiff/demo-video", ["sgdiff.families.flux.pipeline", "sgdiff.families.flux.shard", "sgdiff.models.flux"]),
    ],
)
def test_a_request_imports_only_its_familys_code(model, other_family, tmp_path):
    modules = modules_of("--model-path", model, "--prompt", "a red circle", "--output-path", str(tmp_path))
    assert list(tmp_path.iterdir())  # it did write its output
    assert imported(modules, other_family) == []
    assert imported(modules, NEVER) == []
    own = "sgdiff.models.flux" if model.endswith("image") else "sgdiff.models.wan"
    assert own in modules  # (the check sees what is imported)
