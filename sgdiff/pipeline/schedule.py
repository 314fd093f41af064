"""Flow-matching Euler sampling as plain functions over tensors.

Sigmas run from 1 (pure noise) to 0 (the image); the model predicts the velocity
v = noise - x0, and one Euler step is x <- x + (sigma_next - sigma) * v.
FLUX and Qwen-Image shift the sigmas towards the noisy end, more for larger images (`mu`
grows linearly with the number of image tokens); FLUX.1-schnell uses a fixed shift;
Qwen-Image then stretches them to end at `shift_terminal` instead of 1 / num_steps. Wan's
Euler configs let the scheduler space the sigmas itself (`flow_match_spaced_sigmas`);
Wan's UniPC is in families/wan/unipc.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch

from sgdiff.errors import UserError


@dataclass(frozen=True)
class FlowMatchSchedule:
    """The fields of diffusers' FlowMatchEulerDiscreteScheduler config that FLUX and Qwen-Image use."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float = 0.0  # 0: off; else the last sigma before 0 (Qwen-Image: 0.02)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FlowMatchSchedule:
        """Refuses scheduler options sgdiff does not implement, rather than ignoring them."""
        for key, inert in UNSUPPORTED_OPTIONS.items():
            if raw.get(key) not in inert:
                raise UserError(
                    f"scheduler option {key}={raw[key]!r} is not supported by sgdiff's flow-matching schedule"
                )
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = raw.get(f.name)
            if value is None:
                continue
            if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, (int, float)):
                raise UserError(f"scheduler option {f.name} must be {f.type}, got {value!r}")
            values[f.name] = value
        return cls(**values)


# diffusers FlowMatchEulerDiscreteScheduler options and the values under which they change nothing
UNSUPPORTED_OPTIONS: dict[str, tuple] = {
    "use_karras_sigmas": (None, False),
    "use_exponential_sigmas": (None, False),
    "use_beta_sigmas": (None, False),
    "invert_sigmas": (None, False),
    "stochastic_sampling": (None, False),
    "time_shift_type": (None, "exponential"),
}


def resolution_shift_mu(image_seq_len: int, schedule: FlowMatchSchedule) -> float:
    """Linear in the number of image tokens: base_shift at base_image_seq_len, max_shift at max
    (slope and intercept rounded as diffusers' pipelines' calculate_shift rounds them)."""
    slope = (schedule.max_shift - schedule.base_shift) / (schedule.max_image_seq_len - schedule.base_image_seq_len)
    intercept = schedule.base_shift - slope * schedule.base_image_seq_len
    return image_seq_len * slope + intercept


def stretch_to_terminal(sigmas: np.ndarray, schedule: FlowMatchSchedule) -> np.ndarray:
    """With `shift_terminal`: the sigmas scaled about 1 so that the last one is shift_terminal, in the
    array's own precision, as diffusers' stretch_shift_to_terminal. Without: as they are."""
    if not schedule.shift_terminal:
        return sigmas
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - schedule.shift_terminal))


def flow_match_sigmas(num_steps: int, image_seq_len: int, schedule: FlowMatchSchedule) -> torch.Tensor:
    """[num_steps + 1] float32 sigmas, shifted, ending with 0."""
    # float32 numpy arithmetic, as diffusers does it, so the sigmas agree to the last bit
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if schedule.use_dynamic_shifting:
        exp_mu = math.exp(resolution_shift_mu(image_seq_len, schedule))
        sigmas = exp_mu / (exp_mu + (1 / sigmas - 1))  # type: ignore[assignment]  # float32 (NEP 50), not float64
    else:
        sigmas = schedule.shift * sigmas / (1 + (schedule.shift - 1) * sigmas)
    sigmas = stretch_to_terminal(sigmas, schedule)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def flow_match_grid(schedule: FlowMatchSchedule) -> torch.Tensor:
    """[num_train_timesteps] float32 training sigmas from 1 down to 1 / num_train_timesteps, shifted
    (without dynamic shifting): the grid diffusers' FlowMatchEulerDiscreteScheduler builds at init."""
    n = schedule.num_train_timesteps
    sigmas = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
    return schedule.shift * sigmas / (1 + (schedule.shift - 1) * sigmas)


def flow_match_spaced_sigmas(num_steps: int, schedule: FlowMatchSchedule) -> torch.Tensor:
    """[num_steps + 1] float32 sigmas ending with 0, as the scheduler spaces them itself when the pipeline
    gives none (Wan): evenly from the grid's first to its last sigma (already shifted), then shifted again,
    in float64 as diffusers does (and stretched to `shift_terminal`). No dynamic shifting."""
    grid, n = flow_match_grid(schedule), schedule.num_train_timesteps
    sigmas = np.linspace(grid[0].item() * n, grid[-1].item() * n, num_steps) / n
    sigmas = stretch_to_terminal(schedule.shift * sigmas / (1 + (schedule.shift - 1) * sigmas), schedule)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])


def euler_step(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One step, computed in float32 and returned in the velocity's dtype."""
    return (latents.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


class Sampler(Protocol):
    """A prepared schedule for one request: the model timesteps, and how to take a step."""

    timesteps: torch.Tensor  # [num_steps], in the model's time units (0..1000)

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor: ...

    def keep_rows(self, rows: torch.Tensor, batch: int) -> None:
        """A batch goes on with `rows` (indices) of its `batch` rows: drop the others' state."""


class FlowMatchEulerSampler:
    """Euler steps over flow-matching sigmas (FLUX): timesteps are sigma * 1000."""

    def __init__(self, sigmas: torch.Tensor, num_train_timesteps: int = 1000):
        self.sigmas = sigmas  # [num_steps + 1], ending with 0
        self.timesteps = sigmas[:-1] * num_train_timesteps

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        return euler_step(latents, velocity, self.sigmas[index], self.sigmas[index + 1])

    def keep_rows(self, rows: torch.Tensor, batch: int) -> None:
        pass  # no state between steps


class SchedulerSampler:
    """A diffusers scheduler instance driving the loop: for Wan's scheduler configs that sgdiff's own
    samplers (families/wan/unipc.py, Euler) do not implement. Schedulers keep state between steps, so
    each request gets its own instance."""

    def __init__(self, scheduler: Any, num_steps: int, device: torch.device):
        self.scheduler = scheduler
        scheduler.set_timesteps(num_steps, device=device)
        scheduler.set_begin_index(0)
        self.timesteps = scheduler.timesteps

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(velocity, self.timesteps[index], latents, return_dict=False)[0]

    def keep_rows(self, rows: torch.Tensor, batch: int) -> None:
        """The scheduler's per-row state (UniPC's model outputs and last sample: tensors shaped like the
        latents, [batch, ...]) cut to `rows`; its schedule (1-D sigmas, timesteps) is left as it is."""
        for name, value in vars(self.scheduler).items():
            if is_rows(value, batch):
                setattr(self.scheduler, name, value[rows.to(value.device)])
            elif isinstance(value, list) and any(is_rows(item, batch) for item in value):
                setattr(self.scheduler, name, [item[rows.to(item.device)] if is_rows(item, batch) else item
                                               for item in value])  # fmt: skip


def is_rows(value: Any, batch: int) -> bool:
    """A tensor with a row per latent of the batch ([batch, C, ...]), not a 1-D schedule."""
    return isinstance(value, torch.Tensor) and value.ndim >= 3 and value.shape[0] == batch


class DmdSampler:
    """Few-step DMD sampling (FastWan): at each timestep the model's flow prediction gives the clean
    latents x0 = x_t - sigma_t * v; before the next timestep they are noised again with fresh noise,
    x = (1 - sigma_next) * x0 + sigma_next * noise; the last x0 is the result.

    The model sees the raw timesteps (e.g. 1000, 757, 522); sigma_t is the sigma of the nearest
    timestep on the shifted flow-matching training grid (`grid_timesteps` -> `grid_sigmas`)."""

    def __init__(self, timesteps, grid_timesteps: torch.Tensor, grid_sigmas: torch.Tensor, draw_noise):
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64)
        self.grid_timesteps = grid_timesteps.double()
        self.grid_sigmas = grid_sigmas.double()
        self.draw_noise = draw_noise  # draw_noise(shape) -> standard normal noise, float32, on the latents' device

    def sigma(self, t: torch.Tensor) -> float:
        return float(self.grid_sigmas[torch.argmin((self.grid_timesteps - float(t)).abs())])

    def keep_rows(self, rows: torch.Tensor, batch: int) -> None:
        raise NotImplementedError("DMD draws one request's noise stream: its requests are never batched")

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        clean = latents.float() - self.sigma(self.timesteps[index]) * velocity.float()
        if index == len(self.timesteps) - 1:
            return clean
        sigma_next = self.sigma(self.timesteps[index + 1])
        return (1 - sigma_next) * clean + sigma_next * self.draw_noise(tuple(latents.shape))


# velocity_fn(latents, timestep, step_index) -> predicted velocity, same shape as latents
VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# on_step(step_index) after each step; it may return the indices of the rows to go on with (a batch
# whose members were cancelled), None: all of them
StepCallback = Callable[[int], "torch.Tensor | None"]


def sample(
    latents: torch.Tensor, sampler: Sampler, velocity_fn: VelocityFn, on_step: StepCallback | None = None
) -> torch.Tensor:
    """The denoising loop: one velocity and one sampler step per timestep, `on_step(i)` after each."""
    for i, t in enumerate(sampler.timesteps):
        latents = sampler.step(velocity_fn(latents, t, i), i, latents)
        rows = on_step(i) if on_step is not None else None
        if rows is not None:
            sampler.keep_rows(rows, latents.shape[0])
            latents = latents[rows.to(latents.device)]  # [B, ...] -> [len(rows), ...]
    return latents
