"""`sgdiff generate --num-gpus N` through the CLI, spawned and under torchrun: one output, written by
rank 0, equal to the single-process one; one summary line, one path on stdout."""

from __future__ import annotations

import subprocess
import sys
import weakref

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


@pytest.mark.parametrize("fails", [False, True])
def test_the_batch_is_gone_before_the_process_group(fails, tiny_flux_dev, tmp_path, monkeypatch):
    """A rank frees its pipeline (CUDA graphs included) before destroying the process group, after a
    batch and after a failure: a live graph that captured NCCL collectives makes ncclCommDestroy
    wait forever (seen on 2 H100s with --enable-cuda-graph; pytorch/pytorch#115388)."""
    from typer.testing import CliRunner

    from sgdiff.cli import main as cli
    from sgdiff.engine import worker
    from sgdiff.pipeline.base import NullEvents

    requests = []
    monkeypatch.setattr(cli, "run", lambda request, quiet: requests.append(request))
    args = ["generate", "--model-path", str(tiny_flux_dev), *REQUEST, "--output-path", str(tmp_path), "--quiet"]
    assert CliRunner().invoke(cli.app, args).exit_code == 0

    engines, alive_at_destroy = [], []
    execute, destroy = worker.execute_batch, worker.dist.destroy_process_group

    def execute_and_watch(prepared, *args, **kwargs):
        engines.append(weakref.ref(prepared.engine))
        report = execute(prepared, *args, **kwargs)
        if fails:
            raise RuntimeError("a failing prompt")
        return report

    def watched_destroy(*args, **kwargs):
        alive_at_destroy.append(engines[0]() is not None)
        destroy(*args, **kwargs)

    monkeypatch.setattr(worker, "execute_batch", execute_and_watch)
    monkeypatch.setattr(worker.dist, "destroy_process_group", watched_destroy)
    spec = worker.RankSpec(0, 1, 0, f"file://{tmp_path / 'store'}")
    if fails:
        with pytest.raises(RuntimeError, match="a failing prompt"):
            worker.run_rank(spec, requests[0], NullEvents(), lambda path: None)
    else:
        report = worker.run_rank(spec, requests[0], NullEvents(), lambda path: None)
        assert len(report.results) == 1
    assert alive_at_destroy == [False]
