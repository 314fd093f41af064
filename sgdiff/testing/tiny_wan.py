"""Tiny random-weight Wan 2.1 / 2.2 pipelines, built fully offline, for tests.

Each variant is structurally the real diffusers pipeline (same pipeline class, component
names, config keys, scheduler config and pipeline extras such as `boundary_ratio` and
`expand_timesteps` as the Wan-AI/*-Diffusers repos) but every network is a few kilobytes
of random weights, so it only ever generates noise. The UMT5 tokenizer is the same kind
of in-code unigram tokenizer as tiny_flux's T5 one; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from sgdiff.pipeline.components import quiet_libraries
from sgdiff.testing.tiny_flux import make_t5_tokenizer

WAN_VARIANTS = ("t2v", "i2v", "t2v-a14b", "i2v-a14b", "ti2v")


@dataclass(frozen=True)
class WanVariant:
    repo: str  # the real checkpoint this variant mirrors
    image_to_video: bool  # WanImageToVideoPipeline (first-frame latent + mask channels in the transformer input)
    image_encoder: bool  # CLIP image encoder + image cross-attention (Wan2.1 I2V only)
    two_experts: bool  # Wan2.2 A14B: `transformer` (high noise) and `transformer_2` (low noise)
    boundary_ratio: float | None
    expand_timesteps: bool  # Wan2.2 TI2V: one timestep per latent token
    wan22_vae: bool  # Wan2.2 VAE: patchified input, residual blocks, 16x spatial compression
    flow_shift: float


VARIANTS: dict[str, WanVariant] = {
    "t2v": WanVariant("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", False, False, False, None, False, False, 3.0),
    "i2v": WanVariant("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", True, True, False, None, False, False, 3.0),
    "t2v-a14b": WanVariant("Wan-AI/Wan2.2-T2V-A14B-Diffusers", False, False, True, 0.875, False, False, 3.0),
    "i2v-a14b": WanVariant("Wan-AI/Wan2.2-I2V-A14B-Diffusers", True, False, True, 0.9, False, False, 3.0),
    "ti2v": WanVariant("Wan-AI/Wan2.2-TI2V-5B-Diffusers", False, False, False, None, True, True, 5.0),
}

# scheduler/scheduler_config.json of the Wan-AI diffusers repos (UniPC in flow mode); only
# flow_shift differs: 3.0 (480p and A14B), 5.0 (TI2V-5B), as diffusers' convert_wan_to_diffusers.py.
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

TEXT_DIM = 32  # UMT5 d_model = transformer text_dim
IMAGE_DIM = 16  # CLIP vision hidden size = transformer image_dim
# 4 heads (Ulysses-4 splits them); rope splits head_dim into t/h/w = 4/4/4 (h = w = 2 * (head_dim // 6))
HEADS, HEAD_DIM = 4, 12

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": HEADS,
    "attention_head_dim": HEAD_DIM,
    "text_dim": TEXT_DIM,
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
VAE21_CONFIG: dict[str, Any] = {
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
VAE22_CONFIG: dict[str, Any] = {
    **VAE21_CONFIG,
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

UMT5_CONFIG: dict[str, Any] = {
    "d_model": TEXT_DIM,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "is_encoder_decoder": False,
    "use_cache": False,
}

# ViT-H/14 at 224px in the real repos; here 32px in 8px patches -> 16 + 1 image tokens
CLIP_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": IMAGE_DIM,
    "intermediate_size": 37,
    "projection_dim": IMAGE_DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "hidden_act": "gelu",
}

# image_processor/preprocessor_config.json of the Wan2.1 I2V repos, at the tiny encoder's size
IMAGE_PROCESSOR_CONFIG: dict[str, Any] = {
    "crop_size": {"height": 32, "width": 32},
    "size": {"shortest_edge": 32},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
}

# model_index.json names as in the real repos; transformers 5 would record `T5Tokenizer` (T5TokenizerFast is
# now an alias of it) and, without torchvision, `CLIPImageProcessorPil`. Both names load the same objects.
REAL_CLASS_NAMES: dict[str, tuple[str, str]] = {
    "tokenizer": ("transformers", "T5TokenizerFast"),
    "image_processor": ("transformers", "CLIPImageProcessor"),
}

M = TypeVar("M", bound=torch.nn.Module)


def _seeded(seed: int, make: Callable[[], M]) -> M:
    """Build a module from its own seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def vae_config(spec: WanVariant) -> dict[str, Any]:
    return VAE22_CONFIG if spec.wan22_vae else VAE21_CONFIG


def transformer_config(spec: WanVariant) -> dict[str, Any]:
    vae = vae_config(spec)
    z_dim = in_channels = vae["z_dim"]
    if spec.image_to_video:  # noise latents + first-frame mask (a channel per frame in a latent frame) + image latents
        in_channels = z_dim + vae["scale_factor_temporal"] + z_dim
    return {
        **TRANSFORMER_CONFIG,
        "in_channels": in_channels,
        "out_channels": z_dim,
        "image_dim": IMAGE_DIM if spec.image_encoder else None,
        "added_kv_proj_dim": HEADS * HEAD_DIM if spec.image_encoder else None,  # = inner dim, as 5120 in the 14B
    }


def make_umt5_text_encoder(tokenizer: T5Tokenizer, seed: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **UMT5_CONFIG,
    )
    return _seeded(seed, lambda: UMT5EncoderModel(config))


def make_image_encoder(seed: int) -> CLIPVisionModelWithProjection:
    return _seeded(seed, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION_CONFIG)))


def make_transformer(spec: WanVariant, seed: int) -> WanTransformer3DModel:
    return _seeded(seed, lambda: WanTransformer3DModel(**transformer_config(spec)))


def make_vae(spec: WanVariant, seed: int) -> AutoencoderKLWan:
    return _seeded(seed, lambda: AutoencoderKLWan(**vae_config(spec)))


def make_wan_pipeline(variant: str = "t2v", seed: int = 0) -> WanPipeline | WanImageToVideoPipeline:
    """Assemble the tiny pipeline of `variant` in memory (nothing is written)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {WAN_VARIANTS}, got {variant!r}")
    spec = VARIANTS[variant]
    tokenizer = make_t5_tokenizer()
    components: dict[str, Any] = {
        "tokenizer": tokenizer,
        "text_encoder": make_umt5_text_encoder(tokenizer, seed),
        "transformer": make_transformer(spec, seed + 1),
        "transformer_2": make_transformer(spec, seed + 2) if spec.two_experts else None,
        "vae": make_vae(spec, seed + 3),
        "scheduler": UniPCMultistepScheduler(**SCHEDULER_CONFIG, flow_shift=spec.flow_shift),
        "boundary_ratio": spec.boundary_ratio,
        "expand_timesteps": spec.expand_timesteps,
    }
    if spec.image_encoder:
        components["image_encoder"] = make_image_encoder(seed + 4)
        components["image_processor"] = CLIPImageProcessor(**IMAGE_PROCESSOR_CONFIG)
    pipe = (WanImageToVideoPipeline if spec.image_to_video else WanPipeline)(**components)
    pipe.register_to_config(**{name: REAL_CLASS_NAMES[name] for name in REAL_CLASS_NAMES if name in components})
    return pipe


def build_tiny_wan(out_dir: str | Path, variant: str = "t2v", seed: int = 0) -> Path:
    """Tiny random-weight Wan pipeline of the given variant, saved in diffusers format (safetensors) under out_dir."""
    out = Path(out_dir)
    pipe = make_wan_pipeline(variant, seed)
    with quiet_libraries():
        pipe.save_pretrained(out, safe_serialization=True)
    return out
