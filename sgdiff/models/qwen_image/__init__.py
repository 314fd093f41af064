from sgdiff.models.qwen_image.config import QwenImageTransformerConfig
from sgdiff.models.qwen_image.transformer import QwenImageTransformer

__all__ = ["QwenImageTransformer", "QwenImageTransformerConfig"]
