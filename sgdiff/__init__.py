"""sgdiff: fast image and video generation with diffusion transformers."""

__version__ = "0.1.0"
