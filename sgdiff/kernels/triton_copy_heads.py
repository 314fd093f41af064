"""A copy between two [B, S, H, D] views whose rows of D channels are contiguous but whose batch,
token and head strides are anything: the exchanges of parallel/symmetric_exchange.py, where the
destination is often a peer GPU's memory. torch's copy_ runs such strided copies element by element
(2-byte stores, which NVLink carries poorly); this kernel moves each row as 16-byte vectors.
Imported only when it runs (Triton is a GPU package)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def copy_heads_kernel(
    src, src_b, src_s, src_h, dst, dst_b, dst_s, dst_h, S, H,
    D: tl.constexpr, DB: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # program (token block, head, batch): BLOCK_S tokens of one head, D channels each
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None]
    h, b = tl.program_id(1), tl.program_id(2)
    d = tl.arange(0, DB)[None, :]
    mask = (s < S) & (d < D)
    x = tl.load(src + b * src_b + s * src_s + h * src_h + d, mask=mask)
    tl.store(dst + b * dst_b + s * dst_s + h * dst_h + d, x, mask=mask)


def copy_heads(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[...] = src; both [B, S, H, D] with stride 1 over D (a peer's mapped memory may be dst)."""
    if src.shape != dst.shape or src.stride(-1) != 1 or dst.stride(-1) != 1:
        raise ValueError(f"copy_heads takes two [B, S, H, D] views of one shape, D contiguous: {src.shape} {dst.shape}")
    b, s, h, d = src.shape
    block_s = 32
    copy_heads_kernel[(triton.cdiv(s, block_s), h, b)](
        src, src.stride(0), src.stride(1), src.stride(2), dst, dst.stride(0), dst.stride(1), dst.stride(2),
        s, h, D=d, DB=triton.next_power_of_2(d), BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
