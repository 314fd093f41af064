"""The demo models' architectures: a small FLUX.1 (text to 128x128 image) and a small Wan2.1 (text to
64x64x9 video), the real diffusers/transformers classes at small sizes, with the demo tokenizers.

Only training (scripts/train_demo.py) builds them; generation loads the saved folders like any checkpoint.
"""

from __future__ import annotations

from typing import Any

from sgdiff.models.repo_configs import FLUX_SCHEDULER_CONFIGS, WAN_SCHEDULER_CONFIG

IMAGE_SIZE = 128
VIDEO_SIZE, VIDEO_FRAMES = 64, 9
TEXT_DIM = 64  # CLIP hidden size, T5/UMT5 d_model
MAX_TEXT_TOKENS = 32  # T5/UMT5 tokens per prompt (the presets' max_sequence_length); captions are shorter

IMAGE_LATENT_CHANNELS = 4
IMAGE_VAE_CONFIG: dict[str, Any] = {  # 4x downsampling: 128x128x3 -> 32x32x4 -> 16x16 = 256 image tokens
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": IMAGE_LATENT_CHANNELS,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * IMAGE_LATENT_CHANNELS,  # 2x2 latent patches packed into channels
    "num_layers": 3,
    "num_single_layers": 3,
    "attention_head_dim": 32,
    "num_attention_heads": 5,
    "joint_attention_dim": TEXT_DIM,
    "pooled_projection_dim": TEXT_DIM,
    "guidance_embeds": False,  # schnell-like: no guidance embedding, no CFG needed
    "axes_dims_rope": (8, 12, 12),
}
CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_DIM,
    "intermediate_size": 2 * TEXT_DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": TEXT_DIM,
    "hidden_act": "quick_gelu",
}
T5_CONFIG: dict[str, Any] = {
    "d_model": TEXT_DIM,
    "d_kv": 32,
    "d_ff": 2 * TEXT_DIM,
    "num_layers": 2,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 16,
    "relative_attention_max_distance": 64,
    "is_encoder_decoder": False,
    "use_cache": False,
}
VIDEO_LATENT_CHANNELS = 16
WAN_VAE_CONFIG: dict[str, Any] = {  # 4x space, 4x time: 64x64x9 -> 16x16x3x16 -> 8x8x3 = 192 video tokens
    "base_dim": 16,
    "z_dim": VIDEO_LATENT_CHANNELS,
    "dim_mult": [1, 2, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [True, True],
    "dropout": 0.0,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 4,
    "latents_mean": [0.0] * VIDEO_LATENT_CHANNELS,  # measured on the training clips after the VAE trains
    "latents_std": [1.0] * VIDEO_LATENT_CHANNELS,
}
WAN_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": VIDEO_LATENT_CHANNELS,
    "out_channels": VIDEO_LATENT_CHANNELS,
    "text_dim": TEXT_DIM,
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
UMT5_CONFIG: dict[str, Any] = {**T5_CONFIG}


def make_image_parts() -> dict[str, Any]:
    """Freshly initialised FluxPipeline components (seed torch first)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sgdiff.demo.vocabulary import make_demo_clip_tokenizer, make_demo_t5_tokenizer

    clip_tokenizer, t5_tokenizer = make_demo_clip_tokenizer(), make_demo_t5_tokenizer()
    clip = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
        **CLIP_CONFIG,
    )
    return {
        "tokenizer": clip_tokenizer,
        "text_encoder": CLIPTextModel(clip),
        "tokenizer_2": t5_tokenizer,
        "text_encoder_2": T5EncoderModel(_t5_config(T5Config, t5_tokenizer, T5_CONFIG)),
        "transformer": FluxTransformer2DModel(**FLUX_CONFIG),
        "vae": AutoencoderKL(**IMAGE_VAE_CONFIG),
        # Euler over flow-matching sigmas, no shift (FLUX.1 [schnell]'s scheduler settings)
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIGS["schnell"]),
    }


def make_video_parts() -> dict[str, Any]:
    """Freshly initialised WanPipeline components (seed torch first)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from sgdiff.demo.vocabulary import make_demo_t5_tokenizer

    tokenizer = make_demo_t5_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": UMT5EncoderModel(_t5_config(UMT5Config, tokenizer, UMT5_CONFIG)),
        "transformer": WanTransformer3DModel(**WAN_CONFIG),
        "vae": AutoencoderKLWan(**WAN_VAE_CONFIG),
        "scheduler": UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG, flow_shift=1.0),
    }


def _t5_config(config_class, tokenizer, fields: dict[str, Any]):
    return config_class(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **fields,
    )
