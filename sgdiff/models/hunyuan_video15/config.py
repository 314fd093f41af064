"""HunyuanVideo-1.5 transformer hyper-parameters, read from a diffusers `transformer/config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sgdiff.models.loading import config_fields


@dataclass(frozen=True)
class HunyuanVideo15TransformerConfig:
    in_channels: int = 65  # noise latents (32), the I2V condition latents (32) and their mask (1), on channels
    out_channels: int | None = 32
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    num_layers: int = 54
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 1
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    text_embed_dim: int = 3584  # Qwen2.5-VL hidden states
    text_embed_2_dim: int = 1472  # ByT5 (Glyph-SDXL-v2) hidden states of the quoted glyph texts
    image_embed_dim: int = 1152  # SigLIP image features (I2V)
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    target_size: int = 640  # the pipelines' pixel size for a default height/width: no weight depends on it
    task_type: str = "i2v"  # metadata only ("t2v" / "i2v"): the inputs say which one runs
    use_meanflow: bool = False  # a second timestep embedding (timestep_r; the step-distilled I2V checkpoint)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HunyuanVideo15TransformerConfig:
        return cls(**config_fields(cls, raw))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch(self) -> tuple[int, int, int]:
        """(frames, rows, columns) of latents per token."""
        return self.patch_size_t, self.patch_size, self.patch_size


# Full size. Every HunyuanVideo-1.5 transformer diffusers converts (480p / 720p, T2V / I2V, CFG-distilled) has
# the architecture above (diffusers' defaults; scripts/convert_hunyuan_video1_5_to_diffusers.py sets only
# target_size, task_type and use_meanflow); the 720p ones differ in target_size alone, and the 480p
# step-distilled I2V one adds the meanflow timestep embedding.
HUNYUAN_VIDEO15_480P = HunyuanVideo15TransformerConfig(target_size=640, task_type="t2v")
HUNYUAN_VIDEO15_720P = HunyuanVideo15TransformerConfig(target_size=960, task_type="t2v")
HUNYUAN_VIDEO15_480P_I2V_STEP_DISTILLED = HunyuanVideo15TransformerConfig(
    target_size=640, task_type="i2v", use_meanflow=True
)
