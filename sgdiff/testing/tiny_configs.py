"""The tiny random-weight architectures, written once: FLUX.1 and Wan 2.1 / 2.2 transformers, VAEs and
text (and image) encoders a few kilobytes in size, as the diffusers / transformers config dicts.

tiny_flux.py and tiny_wan.py build whole test pipelines from them; sgdiff/bench/parts.py builds
`sgdiff bench --tiny`'s models from them. Plain data: importing this module loads no library.
"""

from __future__ import annotations

from typing import Any

# --- FLUX.1 ---------------------------------------------------------------------------------------

FLUX_TEXT_DIM = 32  # CLIP hidden size (pooled projection) and T5 d_model (joint attention)
FLUX_LATENT_CHANNELS = 4

FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * FLUX_LATENT_CHANNELS,  # FluxPipeline packs 2x2 latent patches
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,  # Ulysses-4 splits them
    "joint_attention_dim": FLUX_TEXT_DIM,
    "pooled_projection_dim": FLUX_TEXT_DIM,
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
}

FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 16),  # vae_scale_factor = 2
    "layers_per_block": 1,
    "latent_channels": FLUX_LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

FLUX_CLIP: dict[str, Any] = {
    "hidden_size": FLUX_TEXT_DIM,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": FLUX_TEXT_DIM,
    "hidden_act": "quick_gelu",
}

FLUX_T5: dict[str, Any] = {
    "d_model": FLUX_TEXT_DIM,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "is_encoder_decoder": False,
    "use_cache": False,
}

# --- Wan 2.1 / 2.2 --------------------------------------------------------------------------------

WAN_TEXT_DIM = 32  # UMT5 d_model = transformer text_dim
WAN_IMAGE_DIM = 16  # CLIP vision hidden size = transformer image_dim (Wan2.1 I2V)

# in_channels, out_channels and the I2V image fields depend on the variant (tiny_wan.transformer_config)
WAN_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,  # Ulysses-4 splits them
    "attention_head_dim": 12,  # rope splits it into t/h/w = 4/4/4 (h = w = 2 * (head_dim // 6))
    "text_dim": WAN_TEXT_DIM,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
    "pos_embed_seq_len": None,
}

# Wan2.1 VAE (z_dim 16 in the real one): 8x spatial, 4x temporal compression. Latent stats are
# the first z_dim entries of the real ones, so a wrong (de)normalisation shows up in comparisons.
WAN21_VAE: dict[str, Any] = {
    "base_dim": 4,
    "z_dim": 4,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 8,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558],
}

# Wan2.2 VAE (z_dim 48 in the real one): 2x2 patchify (12 channels) + 8x convs = 16x spatial.
WAN22_VAE: dict[str, Any] = {
    **WAN21_VAE,
    "decoder_base_dim": 8,
    "z_dim": 12,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "latents_mean": [
        -0.2289,
        -0.0052,
        -0.1323,
        -0.2339,
        -0.2799,
        0.0174,
        0.1838,
        0.1557,
        -0.1382,
        0.0542,
        0.2813,
        0.0891,
    ],
    "latents_std": [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901],
}

WAN_UMT5: dict[str, Any] = {**FLUX_T5, "d_model": WAN_TEXT_DIM, "d_kv": 16, "d_ff": 64}  # FLUX's T5, wider

# ViT-H/14 at 224px in the real repos; here 32px in 8px patches -> 16 + 1 image tokens
WAN_CLIP_VISION: dict[str, Any] = {
    "hidden_size": WAN_IMAGE_DIM,
    "intermediate_size": 37,
    "projection_dim": WAN_IMAGE_DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "hidden_act": "gelu",
}
