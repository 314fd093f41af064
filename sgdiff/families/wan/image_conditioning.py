"""Image-to-video conditioning (Wan): the input image as VAE latents of the first frame, a mask of
which frames are given, and (Wan2.1 I2V) CLIP image features for the image cross-attention."""

from __future__ import annotations

from typing import Any, cast

import torch

from sgdiff.families.wan.sampling import WanSampling
from sgdiff.io.input_image import load_image
from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.stages.decoding import latent_statistics


def normalized_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, T, H, W] in [-1, 1] -> the VAE's most likely latents, normalised per channel."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    mean, inverse_std = latent_statistics(vae.config, latents)
    return (latents - mean) * inverse_std


def first_frame_mask_channels(num_frames: int, temporal: int, latent_size: tuple[int, ...]) -> torch.Tensor:
    """Wan2.1 I2V's mask: 1 where a pixel frame is given (the first), folded into `temporal`
    channels per latent frame: [1, temporal, latent_frames, h, w]."""
    mask = torch.zeros(1, 1, num_frames, *latent_size)
    mask[:, :, 0] = 1
    # the first frame stands for a whole latent frame: repeat it to `temporal` pixel frames
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)
    # [1, 1, temporal * latent_frames, h, w] -> [1, temporal, latent_frames, h, w]
    return mask.view(1, -1, temporal, *latent_size).transpose(1, 2)


class WanImageConditioningStage(Stage):
    name = "image_encoding"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, vae: Any, image_encoder: Any, image_processor: Any, replace_first_frame: bool, dtype):
        self.vae = vae
        self.image_encoder = image_encoder  # None for Wan2.2 (no image cross-attention)
        self.image_processor = image_processor
        self.replace_first_frame = replace_first_frame  # Wan2.2 TI2V: the first latent frame *is* the image
        self.dtype = dtype  # the transformer's

    def run(self, state: State) -> None:
        from diffusers.video_processor import VideoProcessor

        params = cast(WanSampling, state.params)
        assert params.image_path is not None and params.num_frames is not None  # (OptionalStage; wan_rules)
        image = load_image(params.image_path, state.inputs)
        if self.image_encoder is not None:
            state.shared["encoder_hidden_states_image"] = self.clip_features(image, params, state.device)
        spatial = self.vae.config.scale_factor_spatial
        pixels = VideoProcessor(vae_scale_factor=spatial).preprocess(image, height=params.height, width=params.width)
        pixels = pixels.to(state.device, torch.float32).unsqueeze(2)  # [1, 3, 1, H, W]
        if self.replace_first_frame:
            condition = normalized_latents(self.vae, pixels).float()
            frames = (params.num_frames - 1) // self.vae.config.scale_factor_temporal + 1
            mask = torch.ones(1, 1, frames, *condition.shape[-2:], device=state.device)
            mask[:, :, 0] = 0  # 0: take the image's latents there
            state.shared["first_frame_mask"] = mask
        else:
            rest = pixels.new_zeros(1, 3, params.num_frames - 1, params.height, params.width)
            condition = normalized_latents(self.vae, torch.cat([pixels, rest], dim=2)).float()
            temporal = self.vae.config.scale_factor_temporal
            mask = first_frame_mask_channels(params.num_frames, temporal, tuple(condition.shape[-2:]))
            condition = torch.cat([mask.to(condition.device), condition], dim=1)
        state.shared["image_condition"] = condition.repeat(params.num_outputs_per_prompt, 1, 1, 1, 1)

    def clip_features(self, image, params: WanSampling, device: torch.device) -> torch.Tensor:
        inputs = self.image_processor(images=image, return_tensors="pt").to(device)
        hidden = self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
        return hidden.repeat(params.num_outputs_per_prompt, 1, 1).to(self.dtype)
