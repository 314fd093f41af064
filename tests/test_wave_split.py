"""The attention split at tile waves (sgdiff/speed/wave_split.py): which shapes it splits, and that a
split attention is the attention over every head and key (its merge kernel: tests/test_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from sgdiff.models.attention import sdpa_attention
from sgdiff.speed.attention_backends import attention_backend
from sgdiff.speed.wave_split import split_attention, split_pieces, wave_plan, wave_split_attention

H100_SMS = 132


@pytest.mark.parametrize(
    "shape, plan",
    [
        # FLUX.1-dev 1024^2 under Ulysses-2: 12 heads x 36 tiles = 3.27 waves -> 11 heads (3 waves) + 1 in 3 key blocks
        ((1, 12, 4608, 4608), (11, 3)),
        ((1, 12, 4608, 4600), (11, 2)),  # keys that 3 does not divide: 2 blocks (still worth it)
        ((1, 24, 4608, 4608), None),  # one GPU: the 2 heads over 6 waves do not fit one wave split in 2
        ((2, 12, 4608, 4608), None),  # batch 2: 72 tiles a head, no block count fits one wave
        ((1, 24, 1536, 1536), None),  # FLUX 512^2: 2.18 waves, but ~20 us waves do not pay the split's cost
        ((1, 6, 32760, 32760), None),  # Wan 480p: one head's 256 tiles never fit one wave
        ((1, 12, 2048, 2048), None),  # 1.45 waves: 8 heads + 4 in 2 blocks save half a ~25 us wave, not its cost
    ],
)
def test_plan_splits_only_where_whole_waves_save_more_than_the_split_costs(shape, plan):
    batch, heads, q_len, k_len = shape
    assert wave_plan(batch, heads, q_len, k_len, H100_SMS) == plan


@pytest.mark.parametrize("batch, heads, plan", [(1, 12, (11, 3)), (2, 5, (3, 4)), (1, 3, (1, 2))])
def test_split_attention_is_the_attention_over_every_head_and_key(batch, heads, plan):
    g = torch.Generator().manual_seed(heads)
    q, k, v = (torch.randn(batch, 48, heads, 16, generator=g) for _ in range(3))
    got = split_attention(q, k, v, plan)
    assert got.shape == (batch, 48, heads, 16)
    assert (got - sdpa_attention(q, k, v)).abs().max() < 1e-5


def test_auto_backend_splits_on_cuda_and_is_sdpa_on_the_cpu():
    assert attention_backend("auto", torch.device("cuda"), torch.bfloat16) is wave_split_attention
    assert attention_backend("auto", torch.device("cpu"), torch.bfloat16) is sdpa_attention
    q = torch.randn(1, 4608, 12, 128)  # the FLUX Ulysses-2 shape, on the CPU: never split
    k = q[:, :512]  # (a short, cheap key set: the CPU path is SDPA whatever the shapes)
    assert torch.equal(wave_split_attention(q, k, k), sdpa_attention(q, k, k))


def test_pieces_are_the_split_attention_at_their_heads():
    """What Ulysses-2 sends back as it is (no concatenated copy): each piece at its first head."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 48, 12, 16, generator=g) for _ in range(3))
    pieces = split_pieces(q, k, v, (11, 3))
    assert [(first, piece.shape[2]) for first, piece in pieces] == [(0, 11), (11, 1)]
    whole = sdpa_attention(q, k, v)
    for first, piece in pieces:
        assert (piece - whole[:, :, first : first + piece.shape[2]]).abs().max() < 1e-5
    # on the CPU (no plan) the backend's pieces are one: the attention itself
    ((first, only),) = wave_split_attention.pieces(q, k, v)
    assert first == 0 and torch.equal(only, whole)
