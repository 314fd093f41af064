"""FLUX.1 text-to-image (FluxPipeline checkpoints)."""

from sgdiff.families.flux.family import FluxFamily
from sgdiff.pipeline.registry import register_family

FAMILY = register_family(FluxFamily())
