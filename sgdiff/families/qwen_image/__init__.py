"""Qwen-Image text-to-image (QwenImagePipeline checkpoints); the Edit pipelines are to join this folder."""

from sgdiff.families.qwen_image.family import QwenImageFamily
from sgdiff.pipeline.registry import register_family

FAMILY = register_family(QwenImageFamily())
