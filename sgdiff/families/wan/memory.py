"""The least memory a Wan request's own tensors take at their peak (engine/memory.py refuses what
cannot fit on the CPU before anything is allocated)."""

from __future__ import annotations

import torch

from sgdiff.families.wan.sampling import WanSampling
from sgdiff.models.video_vae.config import VideoVaeConfig

VAE_BYTES = 4  # the Wan VAE decodes in float32


def wan_activation_floor(info, params: WanSampling, dtype: torch.dtype) -> int:
    """Bytes: the larger of the transformer's (the video's tokens: hidden state beside the feed-forward's
    activation) and the decoding's (the whole decoded video in float32, beside two full-resolution
    feature maps of one frame at the decoder's narrowest width)."""
    assert params.num_frames is not None  # a checked request's (wan_rules)
    config = info.transformer_config
    hidden = config.get("num_attention_heads", 12) * config.get("attention_head_dim", 128)
    ffn = config.get("ffn_dim", 4 * hidden)
    _, patch_h, patch_w = config.get("patch_size", (1, 2, 2))
    vae = VideoVaeConfig.from_dict(info.vae_config, source=str(info.model_dir / "vae" / "config.json"))
    latent_frames = (params.num_frames - 1) // vae.scale_factor_temporal + 1
    cell = vae.scale_factor_spatial
    tokens = latent_frames * (params.height // (cell * patch_h)) * (params.width // (cell * patch_w))
    transformer = tokens * (hidden + ffn) * dtype.itemsize
    pixels = params.height * params.width
    decoding = 3 * params.num_frames * pixels * VAE_BYTES + 2 * pixels * vae.decoder_dim * VAE_BYTES
    return max(transformer, decoding) * params.num_outputs_per_prompt
