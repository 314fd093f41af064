"""Qwen-Image: text to image (QwenImagePipeline) and image editing (QwenImageEditPipeline,
QwenImageEditPlusPipeline) checkpoints."""

from sgdiff.families.qwen_image.family import QwenImageFamily
from sgdiff.pipeline.registry import register_family

FAMILY = register_family(QwenImageFamily())
