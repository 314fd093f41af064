"""Wan's kernel warm-up (ModelFamily.warm_up): one forward of a one-layer UMT5 encoder and of a one-block
transformer at the request's shapes, while the checkpoint loads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from sgdiff.families.wan.sampling import WanSampling
from sgdiff.models.loading import build_on_meta, with_empty_weights
from sgdiff.models.wan import WanTransformer, WanTransformerConfig
from sgdiff.models.wan.transformer import KEEP_FP32
from sgdiff.pipeline.text_encoders import warm_up_t5_encoder

CLIP_IMAGE_TOKENS = 257  # the CLIP image features an I2V transformer attends to


def warm_up_wan(info, params: WanSampling, device: torch.device, dtype: torch.dtype,
                prepare: Callable[[nn.Module], None]) -> None:  # fmt: skip
    config = replace(WanTransformerConfig.from_dict(info.transformer_config), num_layers=1)
    model = with_empty_weights(build_on_meta(WanTransformer, config), dtype, device, KEEP_FP32)
    prepare(model)
    assert params.num_frames is not None  # a checked request's (wan_rules)
    spatial, temporal = info.vae_config.get("scale_factor_spatial", 8), info.vae_config.get("scale_factor_temporal", 4)
    rows, frames = params.num_outputs_per_prompt, (params.num_frames - 1) // temporal + 1
    latents = torch.zeros(rows, config.in_channels, frames, params.height // spatial, params.width // spatial,
                          device=device, dtype=dtype)  # fmt: skip
    timestep = torch.zeros(rows, device=device)
    if info.model_index.get("expand_timesteps"):  # one timestep per token (TI2V)
        _, ph, pw = config.patch_size
        timestep = torch.zeros(rows, frames * (latents.shape[3] // ph) * (latents.shape[4] // pw), device=device)
    image = None
    if config.image_dim is not None:
        image = torch.zeros(rows, CLIP_IMAGE_TOKENS, config.image_dim, device=device, dtype=dtype)
    warm_up_t5_encoder(info.model_dir / "text_encoder", dtype, device, 1, params.max_sequence_length, masked=True)
    text = torch.zeros(rows, params.max_sequence_length, config.text_dim, device=device, dtype=dtype)
    model(latents, timestep, text, image)
