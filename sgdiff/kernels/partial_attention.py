"""Attention over one block of keys with its log-sum-exp, and the merge of such partials into the
attention over all their keys. Ring attention (parallel/sequence.py) attends the key blocks that
travel round the ring; the wave split (speed/wave_split.py) attends a few heads' keys in blocks side
by side so that their tiles fill an otherwise thin last wave of the GPU."""

from __future__ import annotations

from functools import cache

import torch

from sgdiff.kernels import kernels_run_on
from sgdiff.speed.compile import constant_under_compile


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp. q, k, v: [B, S, H, D] -> out [B, S, H, D], lse [B, S, H] float32.
    On CUDA cuDNN's kernel (the fastest on Hopper), else flash's; float32 (which both refuse) the
    memory-efficient kernel."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    elif cudnn_attention_runs(q):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)[:2]
        lse = lse.squeeze(-1)  # [B, H, S, 1] -> [B, H, S]
    elif q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        lse = lse[..., : q.shape[1]]  # [B, H, S rounded up to 32] -> [B, H, S]
    return out.transpose(1, 2), lse.transpose(1, 2).float()


def cudnn_attention_runs(q: torch.Tensor) -> bool:
    """cuDNN's fused attention: Hopper or newer, 16-bit inputs."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and cudnn_attention_on(q.device.index)


@constant_under_compile  # no graph break in a compiled block
def cudnn_attention_on(device_index: int) -> bool:
    """Whether cuDNN's fused attention runs on this GPU (cuDNN there, Hopper or newer)."""
    return _cudnn_attention_on(device_index)


@cache
def _cudnn_attention_on(device_index: int) -> bool:
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device_index) >= (9, 0)


def merge_partials(partials: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax over all keys from attention over disjoint key blocks: weight each block's output by
    exp(its lse - the total lse). On CUDA one kernel for 2 to 4 blocks (kernels/lse_merge.py)."""
    outs, lses = [o for o, _ in partials], [lse for _, lse in partials]
    if lse_merge_runs(outs, lses):
        from sgdiff.kernels.lse_merge import lse_merge

        return lse_merge(outs, lses)
    return merge_op_by_op(partials)


def merge_op_by_op(partials: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """merge_partials in torch operations (float32)."""
    total = torch.logsumexp(torch.stack([lse for _, lse in partials]), dim=0)  # [B, S, H]
    out = sum(o.float() * torch.exp(lse - total)[..., None] for o, lse in partials)
    return out.to(partials[0][0].dtype)  # type: ignore[union-attr]  # (a sum of tensors: partials is not empty)


def lse_merge_runs(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> bool:
    """Whether the merge kernel takes these partials: 2 to 4 of one layout, where Triton kernels run."""
    return (
        2 <= len(outs) <= 4
        and kernels_run_on(outs[0])
        and outs[0].stride(-1) == 1
        and all(o.shape == outs[0].shape and o.stride() == outs[0].stride() for o in outs)
        and all(lse.dtype == torch.float32 and lse.stride() == lses[0].stride() for lse in lses)
    )
