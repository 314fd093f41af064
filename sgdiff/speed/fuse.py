"""Fused projections: the Linears a model reads the same input with (FLUX: q, k, v of each stream,
and q, k, v with the MLP's input projection in a single-stream block; Wan: q, k, v of
self-attention, k, v of cross-attention) run as one GEMM each (models/layers.py FusedProjection).

Fused GELU: the Linears a model feeds into tanh GELU (the MLPs' input projections) compute it in
their GEMM's epilogue (models/layers.py gelu_in_epilogue). Such a Linear then runs as its own GEMM,
so mark them before fusing projections: a group loses its GELU member (FLUX's single-block
proj_mlp), which would otherwise need the plain GELU pass over its wide output.

Fused norms: q's and k's RMSNorm and rotary embedding as one Triton kernel per stream
(models/rope.py norm_and_rope, kernels/qk_norm_rope.py)."""

from __future__ import annotations

from torch import nn

from sgdiff.models.layers import FusedProjection


def fuse_gelu(model: nn.Module) -> int:
    """Mark every Linear the model declares (`tanh_gelu_projections()`); returns how many."""
    linears = model.tanh_gelu_projections()
    for linear in linears:
        linear.gelu_epilogue = True
    return len(linears)


def fuse_norms(model: nn.Module) -> int:
    """Mark the model's RMSNorms for the fused q/k norm + RoPE kernel; returns how many."""
    norms = [module for module in model.modules() if isinstance(module, nn.RMSNorm)]
    for norm in norms:
        norm.rope_kernel = True
    return len(norms)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group the model declares (`fusable_projections()`), less the Linears with a GELU
    epilogue; returns how many groups were fused."""
    plain = [tuple(x for x in group if not getattr(x, "gelu_epilogue", False)) for group in model.fusable_projections()]
    groups = [group for group in plain if len(group) > 1]
    for linears in groups:
        linears[0].fused_projection = FusedProjection(linears)
    return len(groups)
