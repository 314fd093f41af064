"""Wan transformer hyper-parameters, read from a diffusers `transformer/config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sgdiff.models.loading import config_fields


@dataclass(frozen=True)
class WanTransformerConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None  # I2V: CLIP image features
    added_kv_proj_dim: int | None = None  # I2V: image cross-attention
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WanTransformerConfig:
        return cls(**config_fields(cls, raw))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head channels given to the frame, height and width rotary axes."""
        h = w = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - h - w, h, w


# Full-size architectures (the Wan-AI/*-Diffusers transformer configs).
WAN21_T2V_1_3B = WanTransformerConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30)
WAN21_T2V_14B = WanTransformerConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40)
