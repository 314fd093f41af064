"""Qwen-Image's latents: image size <-> latent grid, noise drawn as diffusers draws it (one frame of
the video-shaped VAE latents), 2x2 patches packed into channels (FLUX's packing), and the rotary grids
the transformer reads. The Edit pipelines append their input images' grids after the noise grid."""

from __future__ import annotations

import torch

from sgdiff.families.qwen_image.sampling import QwenImageSampling
from sgdiff.models.flux.packing import pack_latents, unpack_latents
from sgdiff.models.qwen_image.rope import Grid


class QwenImageGeometry:
    """Image size <-> latent grid for a VAE that downsamples by `scale` and has `channels` latent channels."""

    def __init__(self, scale: int, channels: int):
        self.scale = scale
        self.channels = channels

    def latent_size(self, params: QwenImageSampling) -> tuple[int, int]:
        step = self.scale * 2  # the VAE, then 2x2 packing
        return 2 * (params.height // step), 2 * (params.width // step)

    def grid(self, params: QwenImageSampling) -> Grid:
        """(frames, rows, cols) of the packed noise tokens."""
        h, w = self.latent_size(params)
        return 1, h // 2, w // 2

    def image_seq_len(self, params: QwenImageSampling) -> int:
        _, rows, cols = self.grid(params)
        return rows * cols

    def noise_shape(self, params: QwenImageSampling) -> tuple[int, ...]:
        return (params.num_outputs_per_prompt, 1, self.channels, *self.latent_size(params))  # [N, 1, C, h, w]

    def pack(self, noise: torch.Tensor, params: QwenImageSampling) -> tuple[torch.Tensor, dict]:
        """[N, 1, C, h, w] -> [N, h/2 * w/2, 4C]; the grids of the image tokens, shared by both CFG branches."""
        return pack_latents(noise[:, 0]), {"image_grids": [self.grid(params)]}

    def unpack(self, tokens: torch.Tensor, params: QwenImageSampling) -> torch.Tensor:
        """[N, h/2 * w/2, 4C] -> [N, C, 1, h, w], the VAE's one-frame video latents."""
        return unpack_latents(tokens, *self.latent_size(params))[:, :, None]
