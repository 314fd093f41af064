"""Fused projections: the Linears a family declares as reading the same input (FusableGroups; FLUX:
q, k, v of each stream; Wan: q, k, v of self-attention, k, v of cross-attention) run as one GEMM
each (models/layers.py FusedProjection).

Fused GELU: the Linears a family declares as feeding tanh GELU (the MLPs' input projections) compute
it in their GEMM's epilogue (models/layers.py gelu_in_epilogue). Such a Linear runs as its own GEMM,
so choose them before fusing projections: a group that declared one loses it.

Fused norms: q's and k's RMSNorm and rotary embedding as one Triton kernel per stream
(models/rope.py norm_and_rope, kernels/qk_norm_rope.py), each adaLN LayerNorm + modulation as
one kernel (models/layers.py, kernels/norm_modulate.py), and each float32 gated residual update as one
(models/layers.py GatedResidual, kernels/triton_gated_residual.py).

Each choice is a typed attribute the layer declares (layers.Linear, layers.RMSNorm,
LayerNormModulation, FP32LayerNorm, GatedResidual), False or None until set here."""

from __future__ import annotations

from torch import nn

from sgdiff.models.layers import FP32LayerNorm, FusedProjection, GatedResidual, LayerNormModulation, RMSNorm
from sgdiff.pipeline.family import FusableGroups


def fuse_gelu(groups: FusableGroups) -> int:
    """The GELU of every Linear in `groups.gelu_projections` in its GEMM; returns how many."""
    for linear in groups.gelu_projections:
        linear.gelu_epilogue = True
    return len(groups.gelu_projections)


def fuse_norms(model: nn.Module) -> int:
    """The model's q/k RMSNorms with the fused norm + RoPE kernel, and its adaLN modulations (FLUX's
    AdaModulation, Qwen-Image's, Wan's float32 LayerNorms) with the fused LayerNorm + modulation
    kernel, and its gated residual updates (Wan's) with the gated residual kernel; returns how many modules
    were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.rope_kernel = True
        elif isinstance(module, (LayerNormModulation, FP32LayerNorm)):
            module.norm_kernel = True
        elif isinstance(module, GatedResidual):
            module.kernel = True
        else:
            continue
        switched += 1
    return switched


def fuse_projections(groups: FusableGroups) -> int:
    """Fuse every group of `groups.projections`, less the Linears with a GELU epilogue; returns how
    many groups were fused. FP8 weights (speed/fp8.py, converted first) fuse as float8 rows."""
    plain = [tuple(linear for linear in group if not linear.gelu_epilogue) for group in groups.projections]
    # (FP8 weights fuse with FP8 ones only: speed/fp8.py converts the same Linears of every group alike)
    fusable = [group for group in plain if len(group) > 1 and len({linear.fp8 for linear in group}) == 1]
    for linears in fusable:
        linears[0].fused = FusedProjection(linears)
    return len(fusable)
