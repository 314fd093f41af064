"""FLUX transformer hyper-parameters, read from a diffusers `transformer/config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sgdiff.models.loading import config_fields


@dataclass(frozen=True)
class FluxTransformerConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FluxTransformerConfig:
        return cls(**config_fields(cls, raw))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


# FLUX.1-dev / FLUX.1-schnell at full size (black-forest-labs/FLUX.1-dev transformer/config.json).
FLUX_DEV = FluxTransformerConfig(guidance_embeds=True)
FLUX_SCHNELL = FluxTransformerConfig(guidance_embeds=False)
