from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sgdiff.errors import UserError
from sgdiff.models.tiles import TiledDecoder
from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.sampling import FamilyParams

# Model latents -> VAE latents [B, C, h, w] (undo packing, patchify, ...)
Unpack = Callable[[torch.Tensor, FamilyParams], torch.Tensor]
# VAE latents -> its output; None on a rank that only helped decode (TILE_SPLIT: rank 0 has the output)
Decode = Callable[[torch.Tensor], "torch.Tensor | None"]


def split_mode(vae: Any) -> ParallelMode:
    """How a decoding stage runs under several processes: TILE_SPLIT where its VAE decodes in tiles that
    can run apart (sgdiff's own decoders): with --vae-tiling every rank decodes some of the tiles and
    rank 0 blends them (parallel/vae.py), the output of one process's tiled decode; untiled (or no larger
    than one tile) rank 0 decodes alone while the others go on. A diffusers VAE: RANK0_ONLY."""
    return ParallelMode.TILE_SPLIT if isinstance(vae, TiledDecoder) else ParallelMode.RANK0_ONLY


def check_finite(latents: torch.Tensor) -> None:
    """Refuse latents that overflowed (NaN or infinity would be saved as a meaningless picture)."""
    if not bool(torch.isfinite(latents).all()):
        raise UserError(
            "the denoised latents hold NaN or infinity (the numbers overflowed): lower `guidance_scale` (or the "
            "model's other guidance scales and shift), or run in bf16/fp32 instead of fp16; nothing was saved"
        )


def to_uint8_images(decoded: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1], [B, 3, H, W] -> [B, H, W, 3] uint8, rounded as diffusers does."""
    images = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (images * 255).round().astype(np.uint8)


class VaeDecodingStage(Stage):
    """An AutoencoderKL-style VAE (sgdiff's ImageVaeDecoder): latents scaled and shifted. Under several
    processes as `split_mode` says."""

    name = "decoding"
    parallel = ParallelMode.RANK0_ONLY
    batchable = True

    def __init__(self, vae: Any, unpack: Unpack):  # vae: sgdiff's ImageVaeDecoder (.config, .dtype, .decode)
        self.vae = vae
        self.unpack = unpack
        self.parallel = split_mode(vae)
        self.decode: Decode = vae.decode  # [B, C, h, w] -> [B, 3, H, W]

    def run(self, state: State) -> None:
        config = self.vae.config
        assert state.latents is not None  # (the denoising stage's)
        check_finite(state.latents)
        latents = self.unpack(state.latents, state.params)
        latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
        decoded = self.decode(latents.to(self.vae.dtype))  # [B, 3, H, W]
        if decoded is not None:  # (None: a rank that helped decode)
            state.images = to_uint8_images(decoded)


def latent_statistics(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan VAE per-channel (mean, 1/std), shaped [1, C, 1, 1, 1] like `like` (dtype, device)."""
    channel = (1, vae_config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae_config.latents_mean).view(channel).to(like.device, like.dtype)
    inverse_std = 1.0 / torch.tensor(vae_config.latents_std).view(channel).to(like.device, like.dtype)
    return mean, inverse_std


class VideoVaeDecodingStage(Stage):
    """Wan-style VAE: latents are normalised per channel (latents_mean / latents_std). Under several
    processes as `split_mode` says: sgdiff's own decoder (text-to-video) shares the tiles of a tiled
    decode out over the ranks; diffusers' AutoencoderKLWan (image-to-video) decodes on rank 0."""

    name = "decoding"
    parallel = ParallelMode.RANK0_ONLY
    batchable = True

    def __init__(self, vae: Any, finalize: Callable[[torch.Tensor, State], torch.Tensor] | None = None):
        self.vae = vae
        self.finalize = finalize  # a last change to the sampled latents (e.g. put back a given first frame)
        self.parallel = split_mode(vae)
        self.decode: Decode = lambda z: vae.decode(z, return_dict=False)[0]  # [B, C, F, h, w] -> [B, 3, T, H, W]

    def run(self, state: State) -> None:
        assert state.latents is not None  # (the denoising stage's)
        latents = self.finalize(state.latents, state) if self.finalize else state.latents
        check_finite(latents)
        latents = latents.to(self.vae.dtype)  # [B, C, F, h, w]
        mean, inverse_std = latent_statistics(self.vae.config, latents)
        decoded = self.decode(latents / inverse_std + mean)  # [B, 3, T, H, W]
        if decoded is None:  # a rank that helped decode: rank 0 has the video
            return
        # [B, 3, T, H, W] -> [B*T, 3, H, W] -> uint8 frames -> [B, T, H, W, 3]
        frames = to_uint8_images(decoded.transpose(1, 2).flatten(0, 1))
        state.videos = frames.reshape(decoded.shape[0], decoded.shape[2], *frames.shape[1:])
