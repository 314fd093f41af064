"""The kernels' warm-up (speed/warm_up.py) runs the very shapes the request's denoising steps run: each
Linear with the same input shape, each attention with the same q/k shapes, on a copy with one block of
each kind; and a warm-up that fails leaves the load alone."""

from __future__ import annotations

import logging

import pytest
import torch

from sgdiff.config import RuntimeConfig, SpeedConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.models.attention import sdpa_attention, use_attention_impl
from sgdiff.pipeline.base import NullEvents
from sgdiff.speed.warm_up import start_warm_up, warms_up


def recorder(shapes: set):
    """Hooks for a model's Linears and an attention impl that note the shapes they see."""

    def note_linear(module, inputs, output) -> None:
        shapes.add(("linear", module.out_features, tuple(inputs[0].shape)))

    def hook(model: torch.nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(note_linear)

    def attention(q, k, v):
        shapes.add(("attention", tuple(q.shape), tuple(k.shape)))
        return sdpa_attention(q, k, v)

    return hook, attention


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_the_warm_up_runs_the_shapes_of_the_request(model, tiny_flux_dev, tiny_wan):
    path = tiny_flux_dev if model == "flux" else tiny_wan("t2v")
    runner = ModelRunner(str(path), runtime=RuntimeConfig(device="cpu"))
    fields = {"height": 48, "width": 32, "num_inference_steps": 1, "num_outputs_per_prompt": 2}
    params = runner.sampling_params("a red cube", **fields, **({"num_frames": 5} if model == "wan" else {}))
    runner.load()
    request_shapes, warm_up_shapes = set(), set()
    hook, runner.pipeline.attention = recorder(request_shapes)
    for transformer in runner.pipeline.transformers:
        hook(transformer)
    runner.generate(params)
    hook, attention = recorder(warm_up_shapes)
    with use_attention_impl(attention), torch.inference_mode():
        runner.family.warm_up(runner.info, params, runner.device, runner.dtype, hook)
    assert any(kind == "attention" for kind, *_ in warm_up_shapes)
    assert warm_up_shapes == request_shapes


def test_a_failing_warm_up_is_logged_and_leaves_the_caller_alone(tiny_flux_dev, caplog):
    runner = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu"))
    params = runner.sampling_params("a red cube")

    def fails(*args) -> None:
        raise RuntimeError("CUDA out of memory")

    runner.family.warm_up = fails  # (this instance only)
    try:
        with caplog.at_level(logging.WARNING):
            thread = start_warm_up(runner.family, runner.info, params, runner.device, runner.dtype, runner.speed,
                                   runner.attention, NullEvents())  # fmt: skip
            thread.join(10)
    finally:
        del runner.family.warm_up
    assert not thread.is_alive() and "the kernels' warm-up failed (CUDA out of memory)" in caplog.text


def test_warm_up_where_it_helps():
    cuda = torch.device("cuda")
    assert warms_up(cuda, SpeedConfig()) and warms_up(cuda, SpeedConfig(cuda_graph=True))
    assert not warms_up(cuda, SpeedConfig(torch_compile=True)) and not warms_up(torch.device("cpu"), SpeedConfig())
