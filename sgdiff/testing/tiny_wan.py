"""Tiny random-weight Wan 2.1 / 2.2 pipelines, built fully offline, for tests.

Each variant is structurally the real diffusers pipeline (same pipeline class, component
names, config keys, scheduler config and pipeline extras such as `boundary_ratio` and
`expand_timesteps` as the Wan-AI/*-Diffusers repos) but every network is a few kilobytes
of random weights (the architectures of tiny_configs.py), so it only ever generates noise.
The UMT5 tokenizer is the same kind of in-code unigram tokenizer as tiny_flux's T5 one;
nothing is downloaded.
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

from sgdiff.models.repo_configs import WAN_CLASS_NAMES, WAN_SCHEDULER_CONFIG
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.testing.tiny_configs import (
    WAN21_VAE,
    WAN22_VAE,
    WAN_CLIP_VISION,
    WAN_IMAGE_DIM,
    WAN_TRANSFORMER,
    WAN_UMT5,
)
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

M = TypeVar("M", bound=torch.nn.Module)


def _seeded(seed: int, make: Callable[[], M]) -> M:
    """Build a module from its own seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def vae_config(spec: WanVariant) -> dict[str, Any]:
    return WAN22_VAE if spec.wan22_vae else WAN21_VAE


def transformer_config(spec: WanVariant) -> dict[str, Any]:
    vae = vae_config(spec)
    z_dim = in_channels = vae["z_dim"]
    if spec.image_to_video:  # noise latents + first-frame mask (a channel per frame in a latent frame) + image latents
        in_channels = z_dim + vae["scale_factor_temporal"] + z_dim
    inner_dim = WAN_TRANSFORMER["num_attention_heads"] * WAN_TRANSFORMER["attention_head_dim"]
    return {
        **WAN_TRANSFORMER,
        "in_channels": in_channels,
        "out_channels": z_dim,
        "image_dim": WAN_IMAGE_DIM if spec.image_encoder else None,
        "added_kv_proj_dim": inner_dim if spec.image_encoder else None,  # as 5120 (its inner dim) in the 14B
    }


def make_umt5_text_encoder(tokenizer: T5Tokenizer, seed: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **WAN_UMT5,
    )
    return _seeded(seed, lambda: UMT5EncoderModel(config))


def make_image_encoder(seed: int) -> CLIPVisionModelWithProjection:
    return _seeded(seed, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**WAN_CLIP_VISION)))


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
        "scheduler": UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG, flow_shift=spec.flow_shift),
        "boundary_ratio": spec.boundary_ratio,
        "expand_timesteps": spec.expand_timesteps,
    }
    if spec.image_encoder:
        components["image_encoder"] = make_image_encoder(seed + 4)
        components["image_processor"] = CLIPImageProcessor(**IMAGE_PROCESSOR_CONFIG)
    pipe = (WanImageToVideoPipeline if spec.image_to_video else WanPipeline)(**components)
    pipe.register_to_config(**{name: WAN_CLASS_NAMES[name] for name in WAN_CLASS_NAMES if name in components})
    return pipe


def build_tiny_wan(out_dir: str | Path, variant: str = "t2v", seed: int = 0) -> Path:
    """Tiny random-weight Wan pipeline of the given variant, saved in diffusers format (safetensors) under out_dir."""
    out = Path(out_dir)
    pipe = make_wan_pipeline(variant, seed)
    with quiet_libraries():
        pipe.save_pretrained(out, safe_serialization=True)
    return out
