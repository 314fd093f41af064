"""`sgdiff generate --num-gpus N` through the CLI, spawned and under torchrun: one output, written by
rank 0, equal to the single-process one; one summary line, one path on stdout."""

from __future__ import annotations

import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

REQUEST = ["--prompt", "a red cube", "--height", "32", "--width", "80", "--steps", "3", "--device", "cpu"]


def generate(launcher: list[str], model, out, *extra: str) -> subprocess.CompletedProcess:
    command = [*launcher, "generate", "--model-path", str(model), *REQUEST, "--output-path", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


SGDIFF = [sys.executable, "-m", "sgdiff.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sgdiff.cli"]


@pytest.fixture(scope="module")
def single(tiny_flux_dev, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = generate(SGDIFF, tiny_flux_dev, out, "--output-file-name", "a", "--quiet")
    assert result.returncode == 0, result.stderr
    return iio.imread(out / "a.png")


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_two_processes_write_the_single_process_image_once(launcher, tiny_flux_dev, single, tmp_path):
    command = SGDIFF if launcher == "spawn" else TORCHRUN
    result = generate(command, tiny_flux_dev, tmp_path, "--output-file-name", "a", "--num-gpus", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "a.png")]  # rank 0 alone prints the path
    assert sum("generated 1 image(s)" in line for line in result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert np.array_equal(iio.imread(tmp_path / "a.png"), single)
