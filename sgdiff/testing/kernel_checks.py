"""Checks of sgdiff's Triton kernels against the unfused path, run on the CPU in Triton's
interpreter: `TRITON_INTERPRET=1 python -m sgdiff.testing.kernel_checks` (tests/test_kernels.py).
Each check raises on a mismatch and prints one line when it holds."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from sgdiff.bench.parts import BENCH_MODELS, TINY_FLUX, TINY_WAN
from sgdiff.kernels.norm_modulate import norm_modulate
from sgdiff.kernels.qk_norm_rope import qk_norm_rope
from sgdiff.models.flux import FluxTransformer
from sgdiff.models.flux.packing import image_position_ids, text_position_ids
from sgdiff.models.layers import AdaModulation, FP32LayerNorm, GatedResidual, RMSNorm
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
    norms = [RMSNorm(head_dim if per_head else width, eps=1e-6, dtype=BF16) for _ in range(2)]
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


def check_copy_heads(degree: int) -> None:
    """Ulysses' symmetric-memory exchange with its ranks simulated in one process (plain tensors as
    the peers' buffers), through the Triton copy and through torch's copy_: the same inboxes and
    outboxes, from strided sources as the models give them (v a slice of a fused projection, the
    attention output SDPA's transposed [B, h, S, D]). Then a source off 16-byte alignment, which the
    kernel declines (the exchange then copies with torch)."""
    from sgdiff.kernels.triton_copy_heads import HeadCopy
    from sgdiff.parallel.symmetric_exchange import copy_to_each, scatter_heads, scatter_sequence

    def triton_copy(src: torch.Tensor, destinations: list[torch.Tensor], pair_stride: int) -> None:
        if not HeadCopy(destinations)(src, pair_stride):
            raise AssertionError("copy_heads declined an aligned copy")

    g = torch.Generator().manual_seed(degree)
    b, s_loc, h, d = 2, 5, 2, 16  # h heads per rank
    heads = degree * h
    fused = [torch.randn(b, s_loc, 3 * heads * d, generator=g).to(BF16) for _ in range(degree)]
    qkv = [tuple(x.unflatten(-1, (3, heads, d)).unbind(2)) for x in fused]  # strided [B, S, H, D] views
    outs = [torch.randn(b, h, degree * s_loc, d, generator=g).to(BF16).transpose(1, 2) for _ in range(degree)]
    results = []
    for copy in (triton_copy, copy_to_each):
        inboxes = [torch.zeros(b, degree, s_loc, 3, h, d, dtype=BF16) for _ in range(degree)]
        outboxes = [torch.zeros(b, s_loc, heads, d, dtype=BF16) for _ in range(degree)]
        for rank in range(degree):
            scatter_heads(qkv[rank], inboxes, rank, copy)
            scatter_sequence(outs[rank], outboxes, rank, copy)
        results.append(inboxes + outboxes)
    for got, expected in zip(*results, strict=True):
        if not torch.equal(got, expected) or not expected.abs().sum():
            raise AssertionError(f"copy_heads differs from torch's copy_ in the exchange of {degree} ranks")
    shifted = fused[0].view(-1)[1 : 1 + b * s_loc * h * d].view(b, s_loc, h, d)  # 2 bytes off alignment
    if HeadCopy([outboxes[0][:, :, :h]])(shifted, 0):
        raise AssertionError("copy_heads took a source off 16-byte alignment")
    print(f"copy_heads in the exchange of {degree} ranks: identical")


def check_lse_merge(parts: int, dtype: torch.dtype) -> None:
    """Ring attention's merge of `parts` partial attentions (each of the same queries over its own
    block of keys, in attention_with_lse's transposed layouts) against the merge in torch operations
    (float32 inside; equal but for the rounding of exp, then at most one step of dtype apart) and, in
    float32, against one attention over all the keys."""
    from sgdiff.kernels.lse_merge import lse_merge
    from sgdiff.kernels.partial_attention import attention_with_lse, merge_op_by_op

    g = torch.Generator().manual_seed(parts)
    b, s, h, d = 2, 37, 3, 24  # sizes that are not powers of 2 (the kernel pads them)
    q = torch.randn(b, s, h, d, generator=g)
    blocks = [(torch.randn(b, n, h, d, generator=g) * 2, torch.randn(b, n, h, d, generator=g)) for n in (5, 19, 8, 11)]
    partials = [(o.to(dtype), lse) for o, lse in (attention_with_lse(q, k, v) for k, v in blocks[:parts])]
    got = lse_merge([o for o, _ in partials], [lse for _, lse in partials]).float()
    expected = merge_op_by_op(partials).float()
    step = 1e-6 if dtype == torch.float32 else 2.0**-7  # relative: float32 rounding / one bf16 step
    if got.shape != (b, s, h, d) or not (got - expected).abs().le(expected.abs() * step + 1e-6).all():
        raise AssertionError(f"lse_merge differs from the merge in torch: {(got - expected).abs().max():.3g}")
    if dtype == torch.float32:
        keys, values = (torch.cat([block[i] for block in blocks[:parts]], dim=1) for i in (0, 1))
        # (mypy matches a starred generator against every parameter: it holds q, k and v)
        whole = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, keys, values)))  # type: ignore[arg-type]
        if (got - whole.transpose(1, 2)).abs().max() > 1e-5:
            raise AssertionError(
                f"lse_merge differs from attention over all keys: {(got - whole.transpose(1, 2)).abs().max():.3g}"
            )
    print(f"lse_merge of {parts} partials, {dtype}: as the merge in torch")


def check_wave_split(plan: tuple[int, int], batch: int) -> None:
    """speed/wave_split.py's split attention (the split heads' key blocks merged by the merge kernel)
    against one attention over every head and key, float32."""
    from sgdiff.speed.wave_split import split_attention

    g = torch.Generator().manual_seed(sum(plan))
    q, k, v = (torch.randn(batch, 36, 5, 16, generator=g) for _ in range(3))
    got = split_attention(q, k, v, plan)
    whole = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)  # type: ignore[arg-type]
    if got.shape != whole.shape or (got - whole).abs().max() > 1e-5:
        raise AssertionError(f"wave split {plan} differs from one attention: {(got - whole).abs().max():.3g}")
    print(f"wave split, {plan[0]} of 5 heads whole, {plan[1]} key blocks, batch {batch}: as one attention")


def seeded_bf16(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 1.0))
    return model.to(BF16).eval()


def check_norm_modulate() -> None:
    """FLUX's bf16 adaLN (every op rounded) and Wan's float32 one (per-token modulation, strided
    shift and scale as Wan's modulation table gives them), against the modules' unfused path."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 6, 48, generator=g) * 3 + 1).to(BF16)
    ada = AdaModulation(48, 2).to(BF16)
    shift, scale = (torch.randn(2, 1, 2 * 48, generator=g).to(BF16)).chunk(2, dim=-1)
    expected = ada.modulate(x, shift, scale)
    got = norm_modulate(x, shift, scale, eps=1e-6, bf16_steps=True)
    if not torch.equal(got, expected):
        raise AssertionError(
            f"norm_modulate (bf16 steps) differs: max {(got.float() - expected.float()).abs().max():.3g}"
        )
    wan_norm = FP32LayerNorm(48, 1e-6, elementwise_affine=False)
    table = torch.randn(2, 6, 3, 48, generator=g)  # [B, S, chunks, D] float32: per-token modulation
    shift, scale, _ = table.unbind(2)
    expected = wan_norm.modulate(x, shift, scale)
    got = norm_modulate(x, shift, scale, eps=1e-6, bf16_steps=False)
    if not torch.equal(got, expected):
        raise AssertionError(f"norm_modulate (float32) differs: max {(got.float() - expected.float()).abs().max():.3g}")
    affine = FP32LayerNorm(48, 1e-6, elementwise_affine=True)
    with torch.no_grad():
        affine.weight.copy_(torch.randn(48, generator=g))
        affine.bias.copy_(torch.randn(48, generator=g))
    expected = affine(x)  # (no kernel: the module is not marked)
    got = norm_modulate(x, affine.bias.float(), affine.weight.float(), eps=1e-6, bf16_steps=False, affine=True)
    if not torch.equal(got, expected):
        raise AssertionError(f"norm_modulate (affine) differs: max {(got.float() - expected.float()).abs().max():.3g}")
    print("norm_modulate bf16 steps, float32 and affine: identical")


def check_gated_residual() -> None:
    """Wan's gated residual update (per-channel and per-token gates, a strided x) against the module's
    unfused path."""
    from sgdiff.kernels.triton_gated_residual import gated_residual

    g = torch.Generator().manual_seed(6)
    residual = GatedResidual()
    x = (torch.randn(2, 6, 96, generator=g) * 4).to(BF16)[..., :48]  # [2, 6, 48], rows 96 apart
    y = (torch.randn(2, 6, 48, generator=g) * 8).to(BF16)
    for gate in (torch.randn(2, 1, 48, generator=g), torch.randn(2, 6, 3, 48, generator=g).unbind(2)[1]):
        expected = residual(x, y, gate)
        got = gated_residual(x, y, gate)
        if not torch.equal(got, expected):
            raise AssertionError(f"gated_residual differs: max {(got.float() - expected.float()).abs().max():.3g}")
    print("gated_residual per channel and per token: identical")


def check_model(name: str, model: nn.Module, inputs: dict, modulations: int, residuals: int = 0) -> None:
    """The whole transformer with its norms marked for the kernels: bit-identical output, each
    kernel run where it should be."""
    from sgdiff.kernels import triton_gated_residual, triton_norm_modulate, triton_qk_norm_rope

    calls = {"qk_norm_rope": 0, "norm_modulate": 0, "gated_residual": 0}  # launches, counted by wrapping them
    launchers = {"qk_norm_rope": triton_qk_norm_rope, "norm_modulate": triton_norm_modulate,
                 "gated_residual": triton_gated_residual}  # fmt: skip

    def counting(kernel: str):
        launch = getattr(launchers[kernel], kernel)

        def count(*args, **kwargs):
            calls[kernel] += 1
            return launch(*args, **kwargs)

        return count

    originals = {kernel: getattr(module, kernel) for kernel, module in launchers.items()}
    for kernel, module in launchers.items():
        setattr(module, kernel, counting(kernel))
    try:
        with torch.no_grad():
            plain = model(**inputs)
            marked = fuse_norms(model)
            fused = model(**inputs)
    finally:
        for kernel, module in launchers.items():
            setattr(module, kernel, originals[kernel])
    rope_calls, norm_calls, residual_calls = calls["qk_norm_rope"], calls["norm_modulate"], calls["gated_residual"]
    if rope_calls != 2 * len(repeated_blocks(model)):  # q and k of every self- or joint attention
        raise AssertionError(f"{name}: the q/k kernel ran {rope_calls} times")
    if norm_calls != modulations:
        raise AssertionError(f"{name}: the LayerNorm + modulation kernel ran {norm_calls} times, not {modulations}")
    if residual_calls != residuals:
        raise AssertionError(f"{name}: the gated residual kernel ran {residual_calls} times, not {residuals}")
    if not torch.equal(plain, fused):
        raise AssertionError(f"{name} with fused norms differs: max {(plain.float() - fused.float()).abs().max():.3g}")
    counts = f"{rope_calls} + {norm_calls} + {residual_calls}"
    print(f"{name}, {marked} modules marked, {counts} kernel calls: identical output")


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
    check_norm_modulate()
    check_gated_residual()
    check_copy_heads(degree=2)
    check_copy_heads(degree=4)
    for parts in (2, 3, 4):
        check_lse_merge(parts, torch.float32)
    check_lse_merge(2, BF16)
    check_wave_split((4, 3), batch=1)
    check_wave_split((2, 4), batch=2)
    flux_config = replace(TINY_FLUX, guidance_embeds=False)
    # 4 modulations per double-stream block, 1 per single-stream block, 1 before the output
    modulations = 4 * flux_config.num_layers + flux_config.num_single_layers + 1
    check_model("FLUX", seeded_bf16(FluxTransformer(flux_config), 3), flux_inputs(flux_config), modulations)
    wan = seeded_bf16(WanTransformer(TINY_WAN), 4)
    norms = (3 if TINY_WAN.cross_attn_norm else 2) * TINY_WAN.num_layers  # adaLN twice a block, the affine norm2
    check_model("Wan", wan, wan_inputs(TINY_WAN), norms, residuals=2 * TINY_WAN.num_layers)
    check_hunyuan_videos()


def check_hunyuan_videos() -> None:
    """HunyuanVideo and -1.5 from their bench inputs (cut to a few text tokens): their first block's video
    stream comes from the patch embedding transposed ([B, D, S] -> [B, S, D], its last dim strided), which the
    LayerNorm + modulation kernel took as contiguous until the launchers copied such rows (bf16 rel err 0.15
    on the H100, run GV)."""
    from sgdiff.bench import hunyuan15_parts, hunyuan_parts
    from sgdiff.models.hunyuan_video import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
    from sgdiff.models.hunyuan_video15 import HunyuanVideo15Transformer, HunyuanVideo15TransformerConfig
    from sgdiff.testing import tiny_hunyuan_video, tiny_hunyuan_video15

    cpu, size = torch.device("cpu"), dict(frames=5, height=32, width=48)
    config = HunyuanVideoTransformerConfig.from_dict(tiny_hunyuan_video.TRANSFORMER)
    model = BENCH_MODELS["hunyuanvideo"]
    inputs = hunyuan_parts.transformer_inputs(model, config, size, torch.Generator().manual_seed(6), cpu)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :7]  # [1, 256, C] -> [1, 7, C]
    inputs["encoder_attention_mask"] = inputs["encoder_attention_mask"][:, :7]
    # 4 modulations per dual-stream block, 1 per single-stream block, 1 before the output
    modulations = 4 * config.num_layers + config.num_single_layers + 1
    check_model("HunyuanVideo", seeded_bf16(HunyuanVideoTransformer(config), 7), inputs, modulations)
    config15 = HunyuanVideo15TransformerConfig.from_dict(tiny_hunyuan_video15.TRANSFORMER)
    model = BENCH_MODELS["hunyuanvideo-1.5"]
    inputs = hunyuan15_parts.transformer_inputs(model, config15, size, torch.Generator().manual_seed(8), cpu)
    modulations = 4 * config15.num_layers + 1  # dual-stream blocks only
    check_model("HunyuanVideo-1.5", seeded_bf16(HunyuanVideo15Transformer(config15), 9), inputs, modulations)


if __name__ == "__main__":
    main()
