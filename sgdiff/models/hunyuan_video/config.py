"""HunyuanVideo transformer hyper-parameters, read from a diffusers `transformer/config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sgdiff.models.loading import config_fields

# diffusers' image_condition_type values this model runs: text to video (None), and HunyuanVideo-I2V's
# "latent_concat" (the image latents ride along as input channels: the same transformer, wider x_embedder)
SUPPORTED_IMAGE_CONDITIONS = (None, "latent_concat")


@dataclass(frozen=True)
class HunyuanVideoTransformerConfig:
    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2  # the text token refiner's blocks
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    image_condition_type: str | None = None

    def __post_init__(self) -> None:
        if self.image_condition_type not in SUPPORTED_IMAGE_CONDITIONS:
            raise ValueError(
                f"HunyuanVideo image_condition_type {self.image_condition_type!r} is not supported "
                "(only None, text to video, and 'latent_concat'; 'token_replace' I2V checkpoints are not)"
            )
        if self.qk_norm != "rms_norm":
            raise ValueError(f"HunyuanVideo qk_norm {self.qk_norm!r} is not supported (only 'rms_norm')")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim {self.rope_axes_dim} must be 3 sizes (frame, row, column) that add up to "
                f"attention_head_dim {self.attention_head_dim}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HunyuanVideoTransformerConfig:
        return cls(**config_fields(cls, raw))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def mlp_dim(self) -> int:
        """The blocks' MLP width (diffusers: int(inner_dim * mlp_ratio))."""
        return int(self.inner_dim * self.mlp_ratio)


# HunyuanVideo at full size (hunyuanvideo-community/HunyuanVideo transformer/config.json: diffusers' defaults).
HUNYUAN_VIDEO = HunyuanVideoTransformerConfig()
