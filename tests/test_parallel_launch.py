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


@pytest.mark.parametrize("launcher", ["spawn", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_two_processes_write_the_single_process_image_once(launcher, tiny_flux_dev, single, tmp_path):
    command = SGDIFF if launcher == "spawn" else TORCHRUN
    result = generate(command, tiny_flux_dev, tmp_path, "--output-file-name", "a", "--num-gpus", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "a.png")]  # rank 0 alone prints the path
    assert sum("generated 1 image(s)" in line for line in result.stderr.splitlines()) == 1
    assert "resource_tracker" not in result.stderr  # no "leaked semaphore objects" warning after the exit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert np.array_equal(iio.imread(tmp_path / "a.png"), single)


@pytest.mark.parametrize("fails", [False, True])
def test_the_model_is_gone_before_the_process_group(fails, tiny_flux_dev, tmp_path, monkeypatch):
    """A rank frees its model (CUDA graphs included) before destroying the process group, after
    serving and after a failure: a live graph that captured NCCL collectives makes ncclCommDestroy
    wait forever (seen on 2 H100s with --enable-cuda-graph; pytorch/pytorch#115388)."""
    from sgdiff.config import EngineConfig, RuntimeConfig
    from sgdiff.engine import worker
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.engine.serve import Inbox

    runtime = RuntimeConfig(device="cpu")
    params = ModelRunner(str(tiny_flux_dev), runtime=runtime).sampling_params("a red cube", height=32, width=80)
    inbox, reports = Inbox(), []
    inbox.put(("run", [("r1", params, {})]))
    inbox.put(("stop",))
    runners, alive_at_destroy = [], []
    serve, destroy = worker.serve_requests, worker.dist.destroy_process_group

    def serve_and_watch(runner, *args, **kwargs):
        runners.append(weakref.ref(runner))
        serve(runner, *args, **kwargs)
        if fails:
            raise RuntimeError("a failing rank")

    def watched_destroy(*args, **kwargs):
        alive_at_destroy.append(runners[0]() is not None)
        destroy(*args, **kwargs)

    class Outbox:
        put = reports.append

    monkeypatch.setattr(worker, "serve_requests", serve_and_watch)
    monkeypatch.setattr(worker.dist, "destroy_process_group", watched_destroy)
    spec = worker.RankSpec(0, 1, 0, f"file://{tmp_path / 'store'}")
    config = EngineConfig(str(tiny_flux_dev), runtime=runtime)
    if fails:
        with pytest.raises(RuntimeError, match="a failing rank"):
            worker.serve_on_rank(spec, config, inbox, Outbox())
    else:
        worker.serve_on_rank(spec, config, inbox, Outbox())
    kinds = [message[0] for message in reports if message[0] != "event"]
    assert kinds == ["ready", "started", "done"]
    assert alive_at_destroy == [False]
