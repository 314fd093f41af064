"""Checks of sgdiff's Triton kernels against the unfused path, run on the CPU in Triton's
interpreter: `TRITON_INTERPRET=1 python -m sgdiff.testing.kernel_checks` (tests/test_kernels.py).
Each check raises on a mismatch and prints one line when it holds."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from sgdiff.bench.parts import TINY_FLUX, TINY_WAN
from sgdiff.kernels.qk_norm_rope import qk_norm_rope
from sgdiff.models.flux import FluxTransformer
from sgdiff.models.flux.packing import image_position_ids, text_position_ids
from sgdiff.models.rope import norm_and_rope, rope_frequencies
from sgdiff.models.wan import WanTransformer
from sgdiff.speed.compile import repeated_blocks
from sgdiff.speed.fuse import fuse_norms

BF16 = torch.bfloat16


def check_qk_norm_rope(heads: int, head_dim: int, per_head: bool) -> None:
    """Two streams (one a strided slice of a wider projection), batch 2: bit-identical to
    RMSNorm -> join -> rotate done op by op."""
    g = torch.Generator().manual_seed(heads * head_dim)
    width = heads * head_dim
    text = torch.randn(2, 5, 3 * width, generator=g).to(BF16)[..., width : 2 * width]
    image = (torch.randn(2, 7, width, generator=g) * 4).to(BF16)
    norms = [nn.RMSNorm(head_dim if per_head else width, eps=1e-6, dtype=BF16) for _ in range(2)]
    for norm in norms:
        nn.init.normal_(norm.weight, 1.0, 0.3, generator=g)
    ids = torch.cat([text_position_ids(5), image_position_ids(1, 7)])
    axes = (head_dim - 2 * (head_dim // 3 // 2 * 2), head_dim // 3 // 2 * 2, head_dim // 3 // 2 * 2)
    rope = rope_frequencies(ids, axes, theta=10000.0)
    expected = norm_and_rope([(text, norms[0]), (image, norms[1])], rope, heads)
    got = qk_norm_rope([text, image], [n.weight for n in norms], rope, heads, 1e-6)
    if got.shape != expected.shape or not torch.equal(got, expected):
        raise AssertionError(f"qk_norm_rope differs: max {(got.float() - expected.float()).abs().max():.3g}")
    print(f"qk_norm_rope heads={heads} head_dim={head_dim} per_head={per_head}: identical")


def seeded_bf16(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 1.0))
    return model.to(BF16).eval()


def check_model(name: str, model: nn.Module, inputs: dict) -> None:
    """The whole transformer with its norms marked for the kernel: bit-identical output, the kernel
    run for q and k of every self- or joint attention."""
    with torch.no_grad():
        plain = model(**inputs)
        marked = fuse_norms(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fused = model(**inputs)
    calls = sum(e.count for e in prof.key_averages() if e.key == "sgdiff::qk_norm_rope")
    if calls != 2 * len(repeated_blocks(model)):
        raise AssertionError(f"{name}: the kernel ran {calls} times")
    if not torch.equal(plain, fused):
        raise AssertionError(f"{name} with fused norms differs: max {(plain.float() - fused.float()).abs().max():.3g}")
    print(f"{name}, {marked} norms marked, {calls} kernel calls: identical output")


def flux_inputs(config, text_len: int = 7, rows: int = 3, cols: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, rows * cols, config.in_channels, generator=g).to(BF16),
        encoder_hidden_states=torch.randn(1, text_len, config.joint_attention_dim, generator=g).to(BF16),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).to(BF16),
        timestep=torch.tensor([0.7]),
        img_ids=image_position_ids(rows, cols),
        txt_ids=text_position_ids(text_len),
    )


def wan_inputs(config) -> dict:
    g = torch.Generator().manual_seed(2)
    return dict(
        hidden_states=torch.randn(1, config.in_channels, 2, 4, 6, generator=g).to(BF16),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 6, config.text_dim, generator=g).to(BF16),
    )


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernels then run on the CPU)")
    check_qk_norm_rope(heads=3, head_dim=16, per_head=True)
    check_qk_norm_rope(heads=3, head_dim=12, per_head=False)
    check_qk_norm_rope(heads=4, head_dim=8, per_head=False)
    flux_config = replace(TINY_FLUX, guidance_embeds=False)
    check_model("FLUX", seeded_bf16(FluxTransformer(flux_config), 3), flux_inputs(flux_config))
    check_model("Wan", seeded_bf16(WanTransformer(TINY_WAN), 4), wan_inputs(TINY_WAN))


if __name__ == "__main__":
    main()
