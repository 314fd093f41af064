"""Hand-written Triton kernels behind the speed toggles. They run on CUDA GPUs, and on the CPU
inside Triton's interpreter (TRITON_INTERPRET=1: how the tests check them); Triton itself is
imported only when a kernel runs."""

from __future__ import annotations

import os

import torch


def kernels_run_on(x: torch.Tensor) -> bool:
    """Whether sgdiff's Triton kernels can take x: on a CUDA GPU, or anywhere in the interpreter."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous, which the row kernels assume (they take the other dims'
    strides), else a contiguous copy: e.g. HunyuanVideo's patch embedding, [B, D, S] transposed to [B, S, D]."""
    return x if x.stride(-1) == 1 else x.contiguous()
