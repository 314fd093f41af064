from __future__ import annotations

from collections.abc import Callable

import torch

from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.sampling import FamilyParams, SamplingParams

# Shape of the initial noise for a request, e.g. [N, C, H/8, W/8] for an image model.
NoiseShape = Callable[[FamilyParams], tuple[int, ...]]
# Turn the noise into what the model consumes; returns (latents, inputs shared by CFG branches).
PrepareNoise = Callable[[torch.Tensor, FamilyParams], tuple[torch.Tensor, dict]]


def seeded_noise(
    shape: tuple[int, ...],
    params: SamplingParams,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian noise drawn as diffusers draws it: one generator seeded with the request's seed,
    on the generator device, in the model dtype, then moved to the model device. Pass `generator`
    to keep drawing from the same stream (DMD sampling re-noises from it)."""
    generator = generator or torch.Generator(params.generator_device).manual_seed(params.seed)
    noise = torch.randn(shape, generator=generator, device=params.generator_device, dtype=dtype)
    return noise.to(device)


class LatentsStage(Stage):
    name = "latents"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, noise_shape: NoiseShape, prepare: PrepareNoise, noise_dtype: torch.dtype | None = None):
        self.noise_shape = noise_shape
        self.prepare = prepare
        self.noise_dtype = noise_dtype  # None: the model dtype (FLUX); Wan keeps its latents in float32

    def run(self, state: State) -> None:
        dtype = self.noise_dtype or state.dtype
        state.generator = torch.Generator(state.params.generator_device).manual_seed(state.params.seed)
        noise = seeded_noise(self.noise_shape(state.params), state.params, dtype, state.device, state.generator)
        state.latents, shared = self.prepare(noise, state.params)
        state.shared.update(shared)
