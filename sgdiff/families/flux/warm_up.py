"""FLUX.1's kernel warm-up (ModelFamily.warm_up): one forward of each text encoder with one layer and of a
transformer with one block of each kind, at the request's shapes, while the checkpoint loads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from sgdiff.families.flux.pipeline import FluxLatentGeometry
from sgdiff.families.flux.sampling import FluxSampling
from sgdiff.models.flux import FluxTransformer, FluxTransformerConfig
from sgdiff.models.flux.packing import image_position_ids, text_position_ids
from sgdiff.models.image_vae import ImageVaeConfig
from sgdiff.models.loading import build_on_meta, with_empty_weights
from sgdiff.pipeline.text_encoders import warm_up_clip_text_encoder, warm_up_t5_encoder


def warm_up_flux(info, params: FluxSampling, device: torch.device, dtype: torch.dtype,
                 prepare: Callable[[nn.Module], None]) -> None:  # fmt: skip
    config = replace(FluxTransformerConfig.from_dict(info.transformer_config), num_layers=1, num_single_layers=1)
    model = with_empty_weights(build_on_meta(FluxTransformer, config), dtype, device)
    prepare(model)
    vae = ImageVaeConfig.from_dict(info.vae_config, source=str(info.model_dir / "vae" / "config.json"))
    geometry = FluxLatentGeometry(2 ** (len(vae.block_out_channels) - 1), config.in_channels // 4)
    rows, (h, w) = params.num_outputs_per_prompt, geometry.latent_size(params)
    guidance = torch.zeros(rows, device=device) if config.guidance_embeds else None
    # the text encoders take the request's one prompt
    warm_up_clip_text_encoder(info.model_dir / "text_encoder", dtype, device, 1)
    warm_up_t5_encoder(info.model_dir / "text_encoder_2", dtype, device, 1, params.max_sequence_length, masked=False)
    model(
        torch.zeros(rows, geometry.image_seq_len(params), config.in_channels, device=device, dtype=dtype),
        torch.zeros(rows, params.max_sequence_length, config.joint_attention_dim, device=device, dtype=dtype),
        torch.zeros(rows, config.pooled_projection_dim, device=device, dtype=dtype),
        torch.zeros(rows, device=device, dtype=dtype),
        img_ids=image_position_ids(h // 2, w // 2).to(device=device, dtype=dtype),
        txt_ids=text_position_ids(params.max_sequence_length).to(device=device, dtype=dtype),
        guidance=guidance,
    )
