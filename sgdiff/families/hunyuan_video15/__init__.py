"""HunyuanVideo-1.5 text to video and image to video (HunyuanVideo15Pipeline and HunyuanVideo15ImageToVideoPipeline
checkpoints, e.g. hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v)."""

from sgdiff.families.hunyuan_video15.family import HunyuanVideo15Family
from sgdiff.pipeline.registry import register_family

FAMILY = register_family(HunyuanVideo15Family())
