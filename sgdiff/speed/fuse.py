"""Fused projections: the Linears a model reads the same input with (FLUX: q, k, v of each stream,
and q, k, v with the MLP's input projection in a single-stream block; Wan: q, k, v of
self-attention, k, v of cross-attention) run as one GEMM each (models/layers.py FusedProjection)."""

from __future__ import annotations

from torch import nn

from sgdiff.models.layers import FusedProjection


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group the model declares (`fusable_projections()`); returns how many."""
    groups = model.fusable_projections()
    for linears in groups:
        linears[0].fused_projection = FusedProjection(linears)
    return len(groups)
