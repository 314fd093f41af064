"""Helpers of the offload tests (sgdiff/offload/): where a module's weights are, a request on a rank of a
parallel run with an offload mode (a run_on_ranks function: importable by the spawned processes), and the
tests' tiny requests, loads on the CPU and exact comparison."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sgdiff.config import OffloadConfig, RuntimeConfig, SpeedConfig
from sgdiff.offload.weights import is_placeholder, module_tensors
from sgdiff.parallel.groups import ParallelGroups

if TYPE_CHECKING:
    from sgdiff.engine.runner import GenerationResult, ModelRunner


def where(module: nn.Module) -> str:
    """'device' where every tensor of `module` holds its weights, 'home' where every one is a placeholder
    (the weights wait in CPU memory), else 'part' (a transformer whose blocks stream)."""
    empty = [is_placeholder(tensor) for tensor in module_tensors(module)]
    return "home" if all(empty) else "device" if not any(empty) else "part"


def offloaded_parallel_latents(
    groups: ParallelGroups, model: str, prompt: str, flags: dict, offload: OffloadConfig
) -> torch.Tensor:
    """A rank's final latents of one request on a parallel pipeline, loaded under `offload`."""
    from sgdiff.config import RuntimeConfig
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.engine.worker import load_for_rank, make_parallel

    engine = ModelRunner(model, runtime=RuntimeConfig(device="cpu", dtype="fp32", offload=offload))
    load_for_rank(engine, groups)
    with make_parallel(engine, groups):
        latents = engine.generate(engine.sampling_params(prompt, **flags)).latents
    assert latents is not None
    return latents


# the offload tests' requests, runs and comparison (tests/test_offload*.py)
FLUX = dict(height=32, width=32, num_inference_steps=2)
WAN = dict(height=32, width=32, num_frames=5, num_inference_steps=3, negative_prompt="blurry", guidance_scale=3.0)


def load(model: Path, offload: OffloadConfig = OffloadConfig(), speed: SpeedConfig = SpeedConfig()) -> ModelRunner:
    """The model loaded on the CPU in float32 under `offload`."""
    from sgdiff.engine.runner import ModelRunner

    runner = ModelRunner(str(model), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed, offload=offload))
    runner.load()
    return runner


def generate(runner: ModelRunner, **request) -> GenerationResult:
    return runner.generate(runner.sampling_params("a red cube", **request))


def assert_same(result: GenerationResult, reference: GenerationResult) -> None:
    """The same latents and decoded outputs, bit for bit."""
    assert result.latents is not None and reference.latents is not None
    assert torch.equal(result.latents, reference.latents)
    for ours, theirs in ((result.images, reference.images), (result.videos, reference.videos)):
        assert (ours is None) == (theirs is None)
        assert ours is None or theirs is None or np.array_equal(ours, theirs)
