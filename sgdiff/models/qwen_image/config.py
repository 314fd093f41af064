"""Qwen-Image transformer hyper-parameters, read from a diffusers `transformer/config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sgdiff.models.loading import config_fields


@dataclass(frozen=True)
class QwenImageTransformerConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False  # builds nothing in diffusers; a guidance input is refused
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False  # the edit images' tokens modulated as at t = 0 (Qwen-Image-Edit-2511)
    use_additional_t_cond: bool = False  # Qwen-Image-Layered: not supported
    use_layer3d_rope: bool = False  # Qwen-Image-Layered: not supported

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QwenImageTransformerConfig:
        return cls(**config_fields(cls, raw))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


# Qwen-Image at full size (Qwen/Qwen-Image transformer/config.json).
QWEN_IMAGE = QwenImageTransformerConfig()
