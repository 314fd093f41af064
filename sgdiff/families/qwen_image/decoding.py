"""Qwen-Image's VAE (diffusers' AutoencoderKLQwenImage, Wan 2.1's causal video VAE for one frame):
loaded through diffusers, its latents normalised per channel (latents_mean / latents_std), an image
decoded as diffusers' pipeline decodes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.components import library_imports, load_library_model
from sgdiff.pipeline.stages.decoding import Unpack, check_finite, latent_statistics, to_uint8_images

ENCODER_PARTS = ("encoder", "quant_conv")  # what only encoding runs


def load_qwen_image_vae(folder: Path, dtype: torch.dtype, device: torch.device, encodes: bool) -> torch.nn.Module:
    """diffusers' AutoencoderKLQwenImage in `dtype`, as the pipeline loads it; its encoder only where the
    pipeline `encodes` (the Edit pipelines' input images)."""
    with library_imports():  # (the text encoder's and tokenizer's transformers imports alongside)
        from diffusers import AutoencoderKLQwenImage

    return load_library_model(AutoencoderKLQwenImage, folder, dtype, device, () if encodes else ENCODER_PARTS)


class QwenImageDecodingStage(Stage):
    name = "decoding"
    parallel = ParallelMode.RANK0_ONLY
    batchable = True

    def __init__(self, vae: Any, unpack: Unpack):  # vae: diffusers' AutoencoderKLQwenImage (.config, .dtype, .decode)
        self.vae = vae
        self.unpack = unpack

    def run(self, state: State) -> None:
        assert state.latents is not None  # (the denoising stage's)
        check_finite(state.latents)
        latents = self.unpack(state.latents, state.params).to(self.vae.dtype)  # [B, C, 1, h, w]
        mean, inverse_std = latent_statistics(self.vae.config, latents)
        decoded = self.vae.decode(latents / inverse_std + mean, return_dict=False)[0]  # [B, 3, 1, H, W]
        state.images = to_uint8_images(decoded[:, :, 0])
