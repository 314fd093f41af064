"""The flow-matching schedule and Euler step against diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from sgdiff.config import load_preset
from sgdiff.models.repo_configs import FLUX_SCHEDULER_CONFIGS
from sgdiff.pipeline.schedule import (
    FlowMatchEulerSampler,
    FlowMatchSchedule,
    euler_step,
    flow_match_sigmas,
    resolution_shift_mu,
    sample,
)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize(("steps", "seq_len"), [(28, 4096), (4, 240), (7, 960), (50, 6000), (1, 16)])
def test_sigmas_match_diffusers_bit_for_bit(variant, steps, seq_len):
    config = FLUX_SCHEDULER_CONFIGS[variant]
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_match_sigmas(steps, seq_len, FlowMatchSchedule.from_dict(config))
    assert torch.equal(ours, scheduler.sigmas)
    assert torch.equal(ours[:-1] * 1000, scheduler.timesteps)


def test_resolution_shift_grows_with_image_tokens():
    schedule = FlowMatchSchedule(use_dynamic_shifting=True)
    assert resolution_shift_mu(256, schedule) == pytest.approx(0.5)
    assert resolution_shift_mu(4096, schedule) == pytest.approx(1.15)
    small, large = flow_match_sigmas(10, 256, schedule), flow_match_sigmas(10, 4096, schedule)
    assert (large[1:-1] > small[1:-1]).all()  # bigger images stay noisier for longer


def test_presets_carry_the_checkpoint_schedules():
    for variant in ("dev", "schnell"):
        preset = load_preset(f"flux.1-{variant}")
        checkpoint = FLUX_SCHEDULER_CONFIGS[variant]
        assert FlowMatchSchedule.from_dict(preset.schedule) == FlowMatchSchedule.from_dict(checkpoint)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_sampling_matches_scheduler_steps(dtype):
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIGS["dev"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=0.8)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(2, 8, 4, generator=g).to(dtype)
    velocities = [torch.randn(2, 8, 4, generator=g).to(dtype) for _ in range(5)]
    expected = start
    for t, v in zip(scheduler.timesteps, velocities, strict=True):
        expected = scheduler.step(v, t, expected, return_dict=False)[0]
    seen = []
    sampler = FlowMatchEulerSampler(scheduler.sigmas)
    assert torch.equal(sampler.timesteps, scheduler.timesteps)
    actual = sample(start, sampler, lambda x, t, i: velocities[i], on_step=seen.append)
    assert seen == [0, 1, 2, 3, 4]
    assert actual.dtype == dtype and torch.equal(actual, expected)


def test_euler_step_lands_on_the_data_at_sigma_zero():
    noise, data = torch.randn(3, 5), torch.randn(3, 5)
    x = 0.25 * data + 0.75 * noise  # sigma = 0.75 on the straight path
    assert torch.allclose(euler_step(x, noise - data, torch.tensor(0.75), torch.tensor(0.0)), data, atol=1e-6)
