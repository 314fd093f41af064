"""Fused projections: the Linears a model reads the same input with (FLUX: q, k, v of each stream;
Wan: q, k, v of self-attention, k, v of cross-attention) run as one GEMM each (models/layers.py
FusedProjection).

Fused GELU: the Linears a model feeds into tanh GELU (the MLPs' input projections) compute it in
their GEMM's epilogue (models/layers.py gelu_in_epilogue). Such a Linear runs as its own GEMM, so
mark them before fusing projections: a group that declared one loses it.

Fused norms: q's and k's RMSNorm and rotary embedding as one Triton kernel per stream
(models/rope.py norm_and_rope, kernels/qk_norm_rope.py), and each adaLN LayerNorm + modulation as
one kernel (models/layers.py, kernels/norm_modulate.py)."""

from __future__ import annotations

from torch import nn

from sgdiff.models.layers import AdaModulation, FP32LayerNorm, FusedProjection


def fuse_gelu(model: nn.Module) -> int:
    """Mark every Linear the model declares (`tanh_gelu_projections()`); returns how many."""
    linears = model.tanh_gelu_projections()
    for linear in linears:
        linear.gelu_epilogue = True
    return len(linears)


def fuse_norms(model: nn.Module) -> int:
    """Mark the model's RMSNorms for the fused q/k norm + RoPE kernel, and its adaLN modulations
    (FLUX's AdaModulation, Wan's float32 LayerNorms) for the fused LayerNorm + modulation kernel;
    returns how many modules were marked."""
    marked = 0
    for module in model.modules():
        if isinstance(module, nn.RMSNorm):
            module.rope_kernel = True
        elif isinstance(module, (AdaModulation, FP32LayerNorm)):
            module.norm_kernel = True
        else:
            continue
        marked += 1
    return marked


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group the model declares (`fusable_projections()`), less the Linears with a GELU
    epilogue; returns how many groups were fused."""
    plain = [tuple(x for x in group if not getattr(x, "gelu_epilogue", False)) for group in model.fusable_projections()]
    groups = [group for group in plain if len(group) > 1]
    for linears in groups:
        linears[0].fused_projection = FusedProjection(linears)
    return len(groups)
