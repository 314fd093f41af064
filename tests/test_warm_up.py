"""The kernels' warm-up (speed/warm_up.py) runs the very shapes the request's denoising steps run: each
Linear with the same input shape, each attention with the same q/k shapes, on a copy with one block of
each kind; and a warm-up that fails leaves the load alone."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch

from sgdiff.config import RuntimeConfig, SpeedConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.models.attention import sdpa_attention, use_attention_impl
from sgdiff.pipeline.base import NullEvents
from sgdiff.speed.warm_up import start_warm_up, warms_up


@contextmanager
def recording(shapes: set, leave_out: set):
    """Note the input shape of every Linear that runs (but those in `leave_out`) and of every attention
    through the entry point, while open."""

    def note_linear(module, inputs, output) -> None:
        if isinstance(module, torch.nn.Linear) and module not in leave_out:
            shapes.add(("linear", module.out_features, tuple(inputs[0].shape)))

    def attention(q, k, v):
        shapes.add(("attention", tuple(q.shape), tuple(k.shape)))
        return sdpa_attention(q, k, v)

    hook = torch.nn.modules.module.register_module_forward_hook(note_linear)
    try:
        with use_attention_impl(attention):
            yield attention
    finally:
        hook.remove()


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_the_warm_up_runs_the_shapes_of_the_request(model, tiny_flux_dev, tiny_wan):
    """Text encoders and transformer: the same Linear input shapes and attention shapes as the request's
    text encoding and denoising (the VAE's left out: its decoding is not warmed up)."""
    path = tiny_flux_dev if model == "flux" else tiny_wan("t2v")
    runner = ModelRunner(str(path), runtime=RuntimeConfig(device="cpu"))
    fields = {"height": 48, "width": 32, "num_inference_steps": 1, "num_outputs_per_prompt": 2}
    params = runner.sampling_params("a red cube", **fields, **({"num_frames": 5} if model == "wan" else {}))
    runner.load()
    vae = set(runner.pipeline.stages[-1].vae.modules())
    request_shapes, warm_up_shapes = set(), set()
    with recording(request_shapes, vae) as attention:
        runner.pipeline.attention = attention
        runner.generate(params)
    with recording(warm_up_shapes, vae), torch.inference_mode():
        runner.family.warm_up(runner.info, params, runner.device, runner.dtype, lambda transformer: None)
    assert any(kind == "attention" for kind, *_ in warm_up_shapes)
    assert warm_up_shapes == request_shapes


class StageEvents(NullEvents):
    def __init__(self):
        self.stages = []

    def stage_started(self, name: str) -> None:
        self.stages.append(f"started {name}")

    def stage_finished(self, name: str, seconds: float) -> None:
        self.stages.append(f"finished {name}")


def test_a_failing_warm_up_is_logged_and_leaves_the_caller_alone(tiny_flux_dev):
    """The progress line it started ends too (the CLI would show it spinning otherwise)."""
    runner = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu"))
    params = runner.sampling_params("a red cube")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("sgdiff.speed.warm_up")  # (the CLI's tests set sgdiff's level and propagation)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)

    def fails(*args) -> None:
        raise RuntimeError("CUDA out of memory")

    runner.family.warm_up = fails  # (this instance only)
    try:
        events = StageEvents()
        thread = start_warm_up(runner.family, runner.info, params, runner.device, runner.dtype, runner.speed,
                               runner.attention, events)  # fmt: skip
        thread.join(10)
    finally:
        del runner.family.warm_up
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert not thread.is_alive() and events.stages == ["started load kernels", "finished load kernels"]
    assert messages == [
        "the kernels' warm-up failed (CUDA out of memory); the first denoising step pays their first calls"
    ]


def test_warm_up_where_it_helps():
    cuda = torch.device("cuda")
    assert warms_up(cuda, SpeedConfig()) and warms_up(cuda, SpeedConfig(cuda_graph=True))
    assert not warms_up(cuda, SpeedConfig(torch_compile=True)) and not warms_up(torch.device("cpu"), SpeedConfig())


class NoThread:
    def join(self) -> None:
        pass


@pytest.fixture
def warm_ups(monkeypatch):
    """Every warm-up the runner starts (as if on a GPU where it would run), by its request."""
    started = []
    monkeypatch.setattr("sgdiff.engine.runner.warms_up", lambda device, speed: True)

    def start(family, info, params, *rest):
        started.append(params)
        return NoThread()

    monkeypatch.setattr("sgdiff.engine.runner.start_warm_up", start)
    return started


def test_generate_loads_without_a_warm_up(warm_ups, tmp_path):
    """From the shell the warm-up cost more load than it saved (docs/benchmarks.md, run FG): none."""
    from typer.testing import CliRunner

    from sgdiff.cli.main import app

    result = CliRunner().invoke(app, ["generate", "--prompt", "a red cube", "--steps", "1", "--height", "32",
                                      "--width", "32", "--output-path", str(tmp_path), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert warm_ups == []


def test_an_engine_started_with_a_request_warms_up_at_its_shapes(warm_ups):
    from sgdiff.engine.service import Engine

    with Engine("sgdiff/demo-image", runtime=RuntimeConfig(device="cpu")) as engine:
        params = engine.request("a red cube", height=48, width=32)
        engine.start(warm_up=params)
    assert warm_ups == [params]
