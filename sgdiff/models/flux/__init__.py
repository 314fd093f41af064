from sgdiff.models.flux.config import FluxTransformerConfig
from sgdiff.models.flux.transformer import FluxTransformer

__all__ = ["FluxTransformer", "FluxTransformerConfig"]
