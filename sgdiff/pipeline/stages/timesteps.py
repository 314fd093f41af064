from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sgdiff.config import SamplingParams
from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.schedule import FlowMatchEulerSampler, FlowMatchSchedule, SchedulerSampler, flow_match_sigmas


class FlowMatchTimestepsStage(Stage):
    """Sigmas for the request's step count, shifted for its resolution."""

    name = "timesteps"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, schedule: FlowMatchSchedule, image_seq_len: Callable[[SamplingParams], int]):
        self.schedule = schedule
        self.image_seq_len = image_seq_len

    def run(self, state: State) -> None:
        params = state.params
        sigmas = flow_match_sigmas(params.num_inference_steps, self.image_seq_len(params), self.schedule)
        state.sampler = FlowMatchEulerSampler(sigmas.to(state.device), self.schedule.num_train_timesteps)


class SchedulerTimestepsStage(Stage):
    """A fresh diffusers scheduler for the request (`make_scheduler(params)`), set to its step count."""

    name = "timesteps"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, make_scheduler: Callable[[SamplingParams], Any]):
        self.make_scheduler = make_scheduler

    def run(self, state: State) -> None:
        scheduler = self.make_scheduler(state.params)
        state.sampler = SchedulerSampler(scheduler, state.params.num_inference_steps, state.device)
