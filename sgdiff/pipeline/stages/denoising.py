from __future__ import annotations

import time
from collections.abc import Callable

import torch

from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.schedule import euler_sample

# denoiser(latents, sigma, inputs, state) -> velocity with the latents' shape
Denoiser = Callable[[torch.Tensor, torch.Tensor, dict, State], torch.Tensor]


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


class DenoisingStage(Stage):
    """Euler flow-matching loop; with CFG, each step runs the prompt and negative branches."""

    name = "denoising"
    parallel = ParallelMode.CFG_SPLIT

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser

    def run(self, state: State) -> None:
        cond_inputs = {**state.shared, **state.cond}
        uncond_inputs = {**state.shared, **state.uncond} if state.uncond is not None else None

        def velocity(latents: torch.Tensor, i: int) -> torch.Tensor:
            sigma = state.sigmas[i]
            v = self.denoiser(latents, sigma, cond_inputs, state)
            if uncond_inputs is None:
                return v
            return guided_velocity(v, self.denoiser(latents, sigma, uncond_inputs, state), state.cfg_scale)

        total = len(state.sigmas) - 1
        last = time.perf_counter()

        def on_step(i: int) -> None:
            nonlocal last
            if state.device.type == "cuda":
                torch.cuda.synchronize(state.device)
            now = time.perf_counter()
            state.step_seconds.append(now - last)
            state.events.step_finished(i, total, now - last)
            last = now

        state.latents = euler_sample(state.latents, state.sigmas, velocity, on_step)
