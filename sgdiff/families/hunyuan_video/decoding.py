"""HunyuanVideo's VAE (diffusers' AutoencoderKLHunyuanVideo, its decoder only): latents / scaling_factor
decoded as diffusers' pipeline decodes them, tiled as diffusers' users run it (`enable_tiling`: tiles of
256x256 pixels where a frame is larger; a video of more than 16 frames is decoded 16 frames at a time
either way), into uint8 frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.components import library_imports, load_library_model
from sgdiff.pipeline.stages.decoding import check_finite, to_uint8_images

ENCODER_PARTS = ("encoder", "quant_conv")  # what only encoding runs: never read


def load_hunyuan_video_vae(folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """diffusers' AutoencoderKLHunyuanVideo in `dtype` (as diffusers' pipeline loads it), tiling on: a 720p
    frame decoded whole would hold its full-resolution feature maps at once."""
    with library_imports():  # (the Llama text encoder's transformers imports alongside)
        from diffusers import AutoencoderKLHunyuanVideo

    vae: Any = load_library_model(AutoencoderKLHunyuanVideo, folder, dtype, device, ENCODER_PARTS)
    vae.enable_tiling()
    return vae


class HunyuanVideoDecodingStage(Stage):
    name = "decoding"
    parallel = ParallelMode.RANK0_ONLY
    batchable = True

    def __init__(self, vae: Any):  # diffusers' AutoencoderKLHunyuanVideo (.config, .dtype, .decode)
        self.vae = vae

    def run(self, state: State) -> None:
        assert state.latents is not None  # (the denoising stage's)
        check_finite(state.latents)
        latents = state.latents.to(self.vae.dtype) / self.vae.config.scaling_factor  # [B, C, F, h, w]
        decoded = self.vae.decode(latents, return_dict=False)[0]  # [B, 3, T, H, W]
        # [B, 3, T, H, W] -> [B*T, 3, H, W] -> uint8 frames -> [B, T, H, W, 3]
        frames = to_uint8_images(decoded.transpose(1, 2).flatten(0, 1))
        state.videos = frames.reshape(decoded.shape[0], decoded.shape[2], *frames.shape[1:])
