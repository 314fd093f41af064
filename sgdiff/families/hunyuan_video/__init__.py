"""HunyuanVideo text to video (HunyuanVideoPipeline checkpoints, e.g. hunyuanvideo-community/HunyuanVideo)."""

from sgdiff.families.hunyuan_video.family import HunyuanVideoFamily
from sgdiff.pipeline.registry import register_family

FAMILY = register_family(HunyuanVideoFamily())
