"""The least memory a FLUX request's own tensors take at their peak (engine/memory.py refuses what
cannot fit on the CPU before anything is allocated)."""

from __future__ import annotations

import torch

from sgdiff.families.flux.sampling import FluxSampling, true_cfg_scale_of
from sgdiff.models.image_vae import ImageVaeConfig

MLP_RATIO = 4  # FLUX's MLPs widen the hidden state 4x


def flux_activation_floor(info, params: FluxSampling, dtype: torch.dtype) -> int:
    """Bytes: the larger of the transformer's (every row's tokens: its hidden state beside the single
    blocks' MLP activation, 1 + 4 widths) and the VAE decoder's (2.5 feature maps per pixel at the width
    that enters full resolution: the demo model's decoder peaked at 2.8 to 3.3 of them on the CPU)."""
    config = info.transformer_config
    hidden = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    vae = ImageVaeConfig.from_dict(info.vae_config, source=str(info.model_dir / "vae" / "config.json"))
    scale = 2 ** (len(vae.block_out_channels) - 1)
    outputs = params.num_outputs_per_prompt
    rows = outputs * (2 if true_cfg_scale_of(params) is not None else 1)
    tokens = (params.height // (scale * 2)) * (params.width // (scale * 2)) + params.max_sequence_length
    transformer = rows * tokens * hidden * (1 + MLP_RATIO) * dtype.itemsize
    widths = vae.block_out_channels
    entering = widths[1] if len(widths) > 1 else widths[0]  # the up block that upsamples to full resolution
    decoder = int(outputs * 2.5 * params.height * params.width * entering * dtype.itemsize)
    return max(transformer, decoder)
