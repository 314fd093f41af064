"""The least memory a Qwen-Image request's own tensors take at their peak (engine/memory.py refuses what
cannot fit on the CPU before anything is allocated)."""

from __future__ import annotations

import torch

from sgdiff.families.qwen_image.editing import VAE_AREA, image_size, sized_to_area
from sgdiff.families.qwen_image.sampling import QwenImageSampling, vae_scale_factor

MLP_RATIO = 4  # Qwen-Image's MLPs widen the hidden state 4x


def qwen_image_activation_floor(info, params: QwenImageSampling, dtype: torch.dtype) -> int:
    """Bytes: the larger of the transformer's (each output's tokens, text and image, its hidden state
    beside the MLP's activation, 1 + 4 widths; the CFG branches run one after the other) and the VAE
    decoder's (two feature maps per pixel at the width of its last, full-resolution stage). An edit
    request's text is not cut at max_sequence_length (counted as none here), its input images' tokens
    join the noise tokens."""
    config = info.transformer_config
    hidden = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    cell = 2 * vae_scale_factor(info.vae_config)  # the VAE, then 2x2 packing
    outputs = params.num_outputs_per_prompt
    text = 0 if params.image_path else params.max_sequence_length
    tokens = (params.height // cell) * (params.width // cell) + text + edit_image_tokens(params, cell)
    transformer = outputs * tokens * hidden * (1 + MLP_RATIO) * dtype.itemsize
    vae = info.vae_config
    width = vae.get("base_dim", 96) * vae.get("dim_mult", (1,))[0]
    decoder = outputs * 2 * params.height * params.width * width * dtype.itemsize
    return max(transformer, decoder)


def edit_image_tokens(params: QwenImageSampling, cell: int) -> int:
    """The tokens the Edit pipelines' input images add (each at about VAE_AREA pixels)."""
    sizes = [sized_to_area(VAE_AREA, *image_size(path)) for path in params.image_path or ()]
    return sum((width // cell) * (height // cell) for width, height in sizes)
