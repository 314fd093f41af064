from sgdiff.models.hunyuan_video15.config import HunyuanVideo15TransformerConfig
from sgdiff.models.hunyuan_video15.transformer import HunyuanVideo15Transformer

__all__ = ["HunyuanVideo15Transformer", "HunyuanVideo15TransformerConfig"]
