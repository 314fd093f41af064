"""The least memory a HunyuanVideo-1.5 request's own tensors take at their peak (engine/memory.py refuses what
cannot fit on the CPU before anything is allocated)."""

from __future__ import annotations

import torch

from sgdiff.families.hunyuan_video15.sampling import VAE_TEMPORAL_FACTOR, HunyuanVideo15Sampling, spatial_factor

MLP_RATIO = 4  # HunyuanVideo-1.5's MLPs widen the hidden state 4x
VAE_TILE = 256  # pixels: the VAE decodes larger frames in tiles of 256x256, every frame at once (load_vae)


def hunyuan_video15_activation_floor(info, params: HunyuanVideo15Sampling, dtype: torch.dtype) -> int:
    """Bytes: the larger of the transformer's (the video's tokens, the context's not counted: each output's hidden
    state beside the MLP's activation, 1 + 4 widths; the CFG branches run one after the other) and the
    decoding's (the decoded video in the VAE's dtype, beside two feature maps of one tile, all its frames, at the
    width of the decoder's last, full-resolution stage: the videos are decoded one at a time)."""
    config = info.transformer_config
    hidden = config.get("num_attention_heads", 16) * config.get("attention_head_dim", 128)
    patch, patch_t = config.get("patch_size", 1), config.get("patch_size_t", 1)
    cell = spatial_factor(info.vae_config) * patch
    latent_frames = (params.num_frames - 1) // VAE_TEMPORAL_FACTOR + 1
    tokens = latent_frames // patch_t * (params.height // cell) * (params.width // cell)
    transformer = tokens * hidden * (1 + MLP_RATIO) * dtype.itemsize
    video = 3 * params.num_frames * params.height * params.width * dtype.itemsize
    width = info.vae_config.get("block_out_channels", (128,))[0]
    tile = params.num_frames * min(params.height, VAE_TILE) * min(params.width, VAE_TILE)
    decoding = video * params.num_outputs_per_prompt + 2 * tile * width * dtype.itemsize  # (one video at a time)
    return max(transformer * params.num_outputs_per_prompt, decoding)
