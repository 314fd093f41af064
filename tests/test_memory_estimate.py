"""On the CPU a request that cannot fit in the memory available is refused before anything is allocated
(engine/memory.py), with the numbers: the weights every process will hold and the request's activations."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import ParallelConfig, RuntimeConfig
from sgdiff.engine import memory
from sgdiff.engine.service import Engine
from sgdiff.errors import UserError

GIB = 2**30


def test_a_huge_image_on_the_cpu_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 16 * GIB)
    result = CliRunner().invoke(app, ["generate", "--prompt", "a red cube", "--height", "8192", "--width", "8192",
                                      "--device", "cpu", "--output-path", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2
    assert result.output.startswith("error: this request needs at least ")
    assert "but 16.0 GiB are available: lower --height and --width, or run it on a GPU" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_estimate_grows_with_the_size_and_the_outputs():
    engine = Engine("sgdiff/demo-image", runtime=RuntimeConfig(device="cpu"))
    runner = engine.runner
    floor = lambda **f: runner.family.activation_floor(runner.info, engine.request("p", **f), runner.dtype)  # noqa: E731
    small, large = floor(height=512, width=512), floor(height=1024, width=1024)
    assert large == 4 * small > 0
    assert floor(height=512, width=512, num_outputs_per_prompt=3) == 3 * small


def test_every_process_holds_its_own_copy_of_the_weights(monkeypatch):
    """--num-gpus 2 on the CPU: the transformer and VAE twice, the text encoders once (rank 0)."""
    cpu = RuntimeConfig(device="cpu")
    one = Engine("sgdiff/demo-image", runtime=cpu)
    two = Engine("sgdiff/demo-image", runtime=cpu, parallel=ParallelConfig(2, ring_degree=2))
    runner = one.runner
    every = memory.loaded_weight_bytes(runner.model_dir, runner.info.model_index, runner.dtype, frozenset())
    shared = memory.loaded_weight_bytes(runner.model_dir, runner.info.model_index, runner.dtype,
                                        runner.family.text_encoders)  # fmt: skip
    assert 0 < shared < every
    activations = runner.family.activation_floor(runner.info, one.request("p", height=64, width=64), runner.dtype)
    enough_for_one = every + activations
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: enough_for_one)
    one.request("p", height=64, width=64)  # fits
    advice = r"MiB of weights in 2 processes.*lower height and width, or num_gpus, or run it on a GPU"
    with pytest.raises(UserError, match=advice):
        two.request("p", height=64, width=64)


def test_a_loaded_engine_refuses_only_what_can_never_fit(monkeypatch):
    """Once loaded (a request may be running, its memory back when it ends), a request is measured
    against all the machine's memory, not what is free at this moment."""
    sizes = {"MemAvailable": 1 * 2**20, "MemTotal": 64 * GIB}
    monkeypatch.setattr(memory, "available_memory_bytes", lambda field="MemAvailable": sizes[field])
    with Engine("sgdiff/demo-image", runtime=RuntimeConfig(device="cpu")) as engine:
        with pytest.raises(UserError, match="but 1 MiB are available"):
            engine.request("p", height=512, width=512)  # before loading: the weights and the request now
        sizes["MemAvailable"] = 64 * GIB
        engine.start()
        sizes["MemAvailable"] = 1 * 2**20
        engine.request("p", height=512, width=512)  # loaded: fits in the machine
        with pytest.raises(UserError, match=r"but this machine has 64\.0 GiB: lower height and width"):
            engine.request("p", height=8192, width=8192, num_outputs_per_prompt=4)
