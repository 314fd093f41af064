"""sgdiff's own HunyuanVideo transformer (diffusers' HunyuanVideoTransformer3DModel layout)."""

from sgdiff.models.hunyuan_video.config import HUNYUAN_VIDEO, HunyuanVideoTransformerConfig
from sgdiff.models.hunyuan_video.transformer import HunyuanVideoTransformer

__all__ = ["HUNYUAN_VIDEO", "HunyuanVideoTransformer", "HunyuanVideoTransformerConfig"]
