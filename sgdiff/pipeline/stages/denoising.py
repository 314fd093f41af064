from __future__ import annotations

import time
from collections.abc import Callable

import torch

from sgdiff.pipeline.base import ParallelMode, Stage, State, stop_if_asked
from sgdiff.pipeline.denoise_step import COND, UNCOND, DenoiseStep, denoise_step
from sgdiff.pipeline.schedule import sample

# denoiser(latents, timestep, inputs, state) -> velocity with the latents' shape
Denoiser = Callable[[torch.Tensor, torch.Tensor, dict, State], torch.Tensor]
# The CFG scale to use at a timestep (Wan2.2 switches it with the expert); default: state.cfg_scale.
CfgScaleAt = Callable[[torch.Tensor, State], float]
# guide(cond, uncond, scale) -> the guided velocity; default: guided_velocity
Guidance = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# branches(run_cond, run_uncond) -> (cond velocity, uncond velocity); parallel/cfg.py runs them on two ranks
BranchRunner = Callable[[Callable[[], torch.Tensor], Callable[[], torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def both_branches_here(run_cond, run_uncond) -> tuple[torch.Tensor, torch.Tensor]:
    return run_cond(), run_uncond()


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


class DenoisingStage(Stage):
    """The sampling loop over `state.sampler`; with CFG, each step runs the prompt and negative branches."""

    name = "denoising"
    parallel = ParallelMode.CFG_SPLIT
    batchable = True  # every row is denoised alike: a batch's rows run as one

    def __init__(self, denoiser: Denoiser, cfg_scale_at: CfgScaleAt | None = None, guide: Guidance | None = None):
        self.denoiser = denoiser
        self.cfg_scale_at = cfg_scale_at or (lambda t, state: state.cfg_scale)
        self.guide = guide or guided_velocity  # how the two branches' velocities combine (Qwen-Image rescales)
        self.branches: BranchRunner = both_branches_here

    def run(self, state: State) -> None:
        cond_inputs = {**state.shared, **state.cond}
        uncond_inputs = {**state.shared, **state.uncond} if state.uncond is not None else None

        def keep(rows: torch.Tensor) -> None:
            """A batch goes on with `rows`: the prompt and negative inputs (a row per latent) cut alike."""
            nonlocal cond_inputs, uncond_inputs
            state.cond = {k: v[rows.to(v.device)] for k, v in state.cond.items()}
            cond_inputs = {**state.shared, **state.cond}
            if state.uncond is not None:
                state.uncond = {k: v[rows.to(v.device)] for k, v in state.uncond.items()}
                uncond_inputs = {**state.shared, **state.uncond}

        def denoise(latents: torch.Tensor, t: torch.Tensor, i: int, inputs: dict, branch: str) -> torch.Tensor:
            # the step and branch, for a step cache applied to the transformer (speed/step_cache/)
            with denoise_step(DenoiseStep(i, total, branch, state.skipped_steps)):
                return self.denoiser(latents, t, inputs, state)

        def velocity(latents: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            if uncond_inputs is None:
                return denoise(latents, t, i, cond_inputs, COND)
            cond, uncond = self.branches(
                lambda: denoise(latents, t, i, cond_inputs, COND),
                lambda: denoise(latents, t, i, uncond_inputs, UNCOND),
            )
            return self.guide(cond, uncond, self.cfg_scale_at(t, state))

        total = len(state.sampler.timesteps)
        last = time.perf_counter()
        done: list = []  # CUDA: an event recorded after each step's kernels

        def report(i: int) -> None:
            nonlocal last
            now = time.perf_counter()
            state.step_seconds.append(now - last)
            state.events.step_finished(i, total, now - last)
            last = now

        def on_step(i: int) -> torch.Tensor | None:
            if state.device.type != "cuda":
                report(i)
            else:
                done.append(torch.cuda.Event())
                done[-1].record()
                if i > 0:  # no host sync on this step: wait for the one before, so the GPU keeps a step queued
                    done[i - 1].synchronize()
                    report(i - 1)
            if i < total - 1:  # a cancel lands here: the GPU holds at most this step's work
                stop_if_asked(state)
                rows = state.rows_to_keep()  # a batch whose members were cancelled goes on without their rows
                if rows is not None:
                    keep(rows)
                return rows
            return None

        assert state.latents is not None  # (the latents stage's)
        state.latents = sample(state.latents, state.sampler, velocity, on_step)
        if done:
            done[-1].synchronize()
            report(total - 1)
