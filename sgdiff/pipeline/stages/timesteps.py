from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.schedule import FlowMatchEulerSampler, FlowMatchSchedule, flow_match_sigmas
from sgdiff.sampling import FamilyParams


class FlowMatchTimestepsStage(Stage):
    """Sigmas for the request's step count, shifted for its resolution."""

    name = "timesteps"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, schedule: FlowMatchSchedule, image_seq_len: Callable[[FamilyParams], int]):
        self.schedule = schedule
        self.image_seq_len = image_seq_len

    def run(self, state: State) -> None:
        params = state.params
        sigmas = flow_match_sigmas(params.num_inference_steps, self.image_seq_len(params), self.schedule)
        state.sampler = FlowMatchEulerSampler(sigmas.to(state.device), self.schedule.num_train_timesteps)


class SamplerStage(Stage):
    """The request's sampler, from `make_sampler(state)` (a fresh diffusers scheduler, DMD, ...)."""

    name = "timesteps"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, make_sampler: Callable[[State], Any]):
        self.make_sampler = make_sampler

    def run(self, state: State) -> None:
        state.sampler = self.make_sampler(state)
