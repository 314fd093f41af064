"""The merge of partial attentions in one pass (kernels/partial_attention.py, merge_partials).

Each partial is the attention of the same queries over one block of keys, with its log-sum-exp; the
softmax over all keys weights partial i by exp(lse_i - total). Done op by op that is about ten passes
over float32 copies of the outputs (FLUX.1-dev Ring-2: ~320 MB per attention); here each output row is
read once and the merged row written once. Up to 4 partials (a ring of up to 4 ranks). Imported
only when it runs (Triton is a GPU package)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def lse_merge_kernel(
    o0, o1, o2, o3, l0, l1, l2, l3, o_b, o_s, o_h, l_b, l_s, l_h, out, out_b, out_s, out_h, S,
    PARTS: tl.constexpr, D: tl.constexpr, DB: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # program (token block, head, batch): BLOCK_S queries of one head, D channels each
    s = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    h, b = tl.program_id(1), tl.program_id(2)
    rows = s < S
    lse_at = b * l_b + s * l_s + h * l_h  # [BLOCK_S]
    lse0 = tl.load(l0 + lse_at, mask=rows, other=0.0)
    lse1 = tl.load(l1 + lse_at, mask=rows, other=0.0)
    top = tl.maximum(lse0, lse1)
    if PARTS > 2:
        lse2 = tl.load(l2 + lse_at, mask=rows, other=0.0)
        top = tl.maximum(top, lse2)
    if PARTS > 3:
        lse3 = tl.load(l3 + lse_at, mask=rows, other=0.0)
        top = tl.maximum(top, lse3)
    d = tl.arange(0, DB)[None, :]
    mask = rows[:, None] & (d < D)
    at = (b * o_b + s * o_s + h * o_h)[:, None] + d  # [BLOCK_S, DB]
    w0, w1 = tl.exp(lse0 - top), tl.exp(lse1 - top)
    total = w0 + w1
    acc = tl.load(o0 + at, mask=mask, other=0.0).to(tl.float32) * w0[:, None]
    acc += tl.load(o1 + at, mask=mask, other=0.0).to(tl.float32) * w1[:, None]
    if PARTS > 2:
        w2 = tl.exp(lse2 - top)
        total += w2
        acc += tl.load(o2 + at, mask=mask, other=0.0).to(tl.float32) * w2[:, None]
    if PARTS > 3:
        w3 = tl.exp(lse3 - top)
        total += w3
        acc += tl.load(o3 + at, mask=mask, other=0.0).to(tl.float32) * w3[:, None]
    merged = acc / total[:, None]
    tl.store(out + (b * out_b + s * out_s + h * out_h)[:, None] + d, merged.to(out.dtype.element_ty), mask=mask)


BLOCK_S, WARPS = 32, 4  # queries per program, warps per program


def lse_merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """outs: 2 to 4 partial attentions [B, S, H, D] of one layout; lses: their log-sum-exps [B, S, H]
    float32, of one layout -> the merged attention [B, S, H, D] (contiguous, the outputs' dtype)."""
    b, s, h, d = outs[0].shape
    merged = torch.empty(b, s, h, d, dtype=outs[0].dtype, device=outs[0].device)
    o = (outs + outs[:1] * 4)[:4]  # unused pointer slots repeat the first (never read)
    lse = (lses + lses[:1] * 4)[:4]
    lse_merge_kernel[(triton.cdiv(s, BLOCK_S), h, b)](
        *o, *lse, *outs[0].stride()[:3], *lses[0].stride(), merged, *merged.stride()[:3], s,
        PARTS=len(outs), D=d, DB=triton.next_power_of_2(d), BLOCK_S=BLOCK_S, num_warps=WARPS,
    )  # fmt: skip
    return merged
