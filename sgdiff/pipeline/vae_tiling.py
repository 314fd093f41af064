"""--vae-tiling (RuntimeConfig.vae_tiling), applied in one place to a loaded pipeline: every VAE its
stages run decodes in tiles and a batch one item at a time, through diffusers' own `enable_tiling` and
`enable_slicing` (diffusers' VAEs) or sgdiff's methods of those names (its own decoders: the same tiles,
overlaps and blending, models/tiles.py). A VAE that also encodes (image-to-video, image editing) encodes
in tiles too, as diffusers' does once tiled.

Off by default: an untiled decode is what diffusers' pipelines run (the outputs sgdiff matches), and
it is faster where it fits in memory (the tiles overlap: at 480p and 720p Wan's tiles cover about
1.65x the latents).
HunyuanVideo's VAE tiles either way (its family turns tiling on)."""

from __future__ import annotations

from typing import Any

from sgdiff.pipeline.base import ComposedPipeline, OptionalStage


def pipeline_vaes(pipeline: ComposedPipeline) -> list[Any]:
    """The VAEs the stages of `pipeline` run (a stage's `vae`), each once."""
    found: dict[int, Any] = {}
    for stage in pipeline.stages:
        inner = stage.stage if isinstance(stage, OptionalStage) else stage
        vae = getattr(inner, "vae", None)
        if vae is not None:
            found.setdefault(id(vae), vae)
    return list(found.values())


def apply_vae_tiling(pipeline: ComposedPipeline) -> list[Any]:
    """Tiled and sliced decoding for every VAE of `pipeline`; returns them."""
    vaes = pipeline_vaes(pipeline)
    for vae in vaes:
        vae.enable_tiling()
        vae.enable_slicing()
    return vaes
