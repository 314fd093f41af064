"""The log-sum-exp merge of partial attentions (ring attention's key blocks, the wave split's) as one
Triton kernel (kernels/triton_lse_merge.py), used by kernels/partial_attention.py's merge_partials on
CUDA GPUs (and in Triton's interpreter by the tests)."""

from __future__ import annotations

import torch


def lse_merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """outs: 2 to 4 partial attentions [B, S, H, D] of one layout, each over its own block of keys;
    lses: their log-sum-exps [B, S, H] float32 -> the attention over all the keys [B, S, H, D]."""
    from sgdiff.kernels.triton_lse_merge import lse_merge as launch

    return launch(outs, lses)
