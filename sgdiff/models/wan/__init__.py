from sgdiff.models.wan.config import WanTransformerConfig
from sgdiff.models.wan.transformer import WanTransformer

__all__ = ["WanTransformer", "WanTransformerConfig"]
