"""Attention split at the GPU's tile waves (part of `--attention-backend auto` on Hopper).

cuDNN's fused attention on Hopper gives each 128 query rows of one head to one CTA, one CTA per SM,
so a call takes ceil(tiles / SMs) waves of nearly equal time. Where the last wave is thin, most SMs
idle through it: FLUX.1-dev 1024² under Ulysses-2 attends 12 heads x 36 tiles = 432 tiles, 3.27
waves on an H100's 132 SMs, run as 4 (12 heads take 57.5% of 24 heads' time: docs/benchmarks.md,
run BZ). Here the heads that fill whole waves (11: 396 tiles, 3 waves) are attended as they are, and
the rest (1 head) with its keys in `parts` blocks side by side in one batched launch (3: 108 CTAs,
each a third as long), merged by log-sum-exp (kernels/partial_attention.py): 3 1/3 waves instead of
4 (229.4 -> 214.6 us a call on an H100, run CB). The plan is a pure function of the shapes and the
GPU, so a run's output does not depend on timing; it is taken only where the waves it saves outweigh
the split's own cost (its copies, the merge and the extra launches: ~25 us on an H100, which is why
FLUX at 512^2, with 1536 keys and ~20 us waves, stays whole).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from sgdiff.kernels.partial_attention import attention_with_lse, cudnn_attention_on, merge_partials
from sgdiff.models.attention import AttentionImpl, sdpa_attention
from sgdiff.speed.compile import constant_under_compile

QUERY_TILE = 128  # query rows per CTA of cuDNN's Hopper attention (head dim 128)
MAX_PARTS = 4  # key blocks of the split heads: the merge kernel takes up to 4 partials
WAVE_NS_PER_KEY = 12.3  # one wave's time per key (H100, head dim 128: 7 waves over 4608 keys in 398 us)
SPLIT_COST_US = 25.0  # the split's copies, merge, concatenation and extra launches (H100, run CB)


def wave_plan(batch: int, heads: int, q_len: int, k_len: int, sms: int) -> tuple[int, int] | None:
    """(heads attended whole, key blocks of the others) for [batch, q_len, heads] queries over k_len
    keys on `sms` SMs, where the split heads fit in one wave and the waves saved outweigh the split's
    cost; else None. The split heads' keys go in equal blocks, so k_len must divide by their count."""
    per_head = batch * math.ceil(q_len / QUERY_TILE)  # tiles
    whole = math.ceil(heads * per_head / sms)
    wave_us = k_len * WAVE_NS_PER_KEY / 1000
    best: tuple[float, int, int] | None = None
    for main in range(1, heads):
        tail = (heads - main) * per_head
        fitting = [p for p in range(2, MAX_PARTS + 1) if tail * p <= sms and k_len % p == 0]
        if not fitting:
            continue
        parts = max(fitting)  # the shortest blocks that still fit in one wave
        waves = math.ceil(main * per_head / sms) + 1 / parts
        if (whole - waves) * wave_us > SPLIT_COST_US and (best is None or waves < best[0]):
            best = (waves, main, parts)
    return None if best is None else best[1:]


def split_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: tuple[int, int], inner: AttentionImpl = sdpa_attention
) -> torch.Tensor:
    """q, k, v [B, S, H, D] -> [B, S, H, D]: heads [0, main) by `inner`, the rest over their keys in
    `parts` blocks in one batched call, merged."""
    return torch.cat([piece for _, piece in split_pieces(q, k, v, plan, inner)], dim=2)


def split_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: tuple[int, int], inner: AttentionImpl = sdpa_attention
) -> list[tuple[int, torch.Tensor]]:
    """split_attention's two pieces, (first head, [B, S, h_i, D]), not yet concatenated."""
    main, parts = plan
    whole = inner(q[:, :, :main], k[:, :, :main], v[:, :, :main])
    split = blocked_keys_attention(q[:, :, main:], k[:, :, main:], v[:, :, main:], parts)
    return [(0, whole), (main, split)]


def blocked_keys_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: int) -> torch.Tensor:
    """Attention over the keys in `parts` equal blocks, as one call of `parts` times the batch."""
    b, s, h, d = q.shape
    # [B, Sk, h, D] -> [B*P, Sk/P, h, D]: block p of batch item i at i*P + p (views)
    k_blocks, v_blocks = (x.unflatten(1, (parts, -1)).flatten(0, 1) for x in (k, v))
    q_each = q.unsqueeze(1).expand(b, parts, s, h, d).flatten(0, 1)  # [B*P, S, h, D] (a copy)
    out, lse = attention_with_lse(q_each, k_blocks, v_blocks)  # [B*P, S, h, D], [B*P, S, h]
    # [B*P, ...] -> P x [B, ...]
    outs, lses = out.unflatten(0, (b, parts)).unbind(1), lse.unflatten(0, (b, parts)).unbind(1)
    return merge_partials(list(zip(outs, lses, strict=True)))


@constant_under_compile  # no graph break in a compiled block
def hopper_sms(device_index: int) -> int:
    """The SM count of a GPU of compute capability 9.0 (H100, H200: the GPUs whose cuDNN tiles and
    timings the plan counts) where cuDNN's attention runs; 0 on any other."""
    return _hopper_sms(device_index)


@cache
def _hopper_sms(device_index: int) -> int:
    if not cudnn_attention_on(device_index) or torch.cuda.get_device_capability(device_index) != (9, 0):
        return 0
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_for(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int] | None:
    """The wave split for these shapes on this GPU (16-bit, head dim 128, Hopper), else None."""
    if not q.is_cuda or q.shape[-1] != 128 or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    sms = hopper_sms(q.device.index)
    return wave_plan(q.shape[0], q.shape[2], q.shape[1], k.shape[1], sms) if sms else None


def wave_split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`--attention-backend auto`: SDPA with cuDNN first, split at tile waves where that saves time."""
    plan = plan_for(q, k)
    return sdpa_attention(q, k, v) if plan is None else split_attention(q, k, v, plan)


def wave_split_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """wave_split_attention as (first head, [B, S, h_i, D]) pieces: for a caller that copies the output
    on anyway (Ulysses sends it back to its tokens' ranks), one copy fewer."""
    plan = plan_for(q, k)
    return [(0, sdpa_attention(q, k, v))] if plan is None else split_pieces(q, k, v, plan)


wave_split_attention.pieces = wave_split_pieces  # type: ignore[attr-defined]
