"""Wan 2.1 / 2.2 video generation (WanPipeline and WanImageToVideoPipeline checkpoints)."""

from sgdiff.families.wan.family import WanFamily
from sgdiff.pipeline.registry import register_family

FAMILY = register_family(WanFamily())
