"""HunyuanVideo's sigmas, as diffusers' HunyuanVideoPipeline asks its FlowMatchEulerDiscreteScheduler for them:
N evenly spaced from 1 (np.linspace(1, 0, N + 1) without its 0), shifted by the checkpoint's fixed `shift` (7),
then Euler steps over them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sgdiff.errors import UserError
from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.schedule import FlowMatchEulerSampler, FlowMatchSchedule, stretch_to_terminal


def hunyuan_video_schedule(raw: dict[str, Any]) -> FlowMatchSchedule:
    """The scheduler config as sgdiff's schedule; refused where diffusers' pipeline could not run it either."""
    schedule = FlowMatchSchedule.from_dict(raw)
    if schedule.use_dynamic_shifting:
        raise UserError(
            "scheduler option use_dynamic_shifting=True is not supported for HunyuanVideo (its pipeline shifts the "
            "sigmas by the fixed `shift`)"
        )
    return schedule


def hunyuan_video_sigmas(num_steps: int, schedule: FlowMatchSchedule) -> torch.Tensor:
    """[num_steps + 1] float32 sigmas, shifted, ending with 0; in float32 numpy arithmetic, as diffusers."""
    sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1].astype(np.float32)
    sigmas = schedule.shift * sigmas / (1 + (schedule.shift - 1) * sigmas)
    sigmas = stretch_to_terminal(sigmas, schedule)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


class HunyuanVideoTimestepsStage(Stage):
    name = "timesteps"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, schedule: FlowMatchSchedule):
        self.schedule = schedule

    def run(self, state: State) -> None:
        sigmas = hunyuan_video_sigmas(state.params.num_inference_steps, self.schedule)
        state.sampler = FlowMatchEulerSampler(sigmas.to(state.device), self.schedule.num_train_timesteps)
