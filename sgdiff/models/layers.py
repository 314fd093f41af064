"""Building blocks shared by the DiTs. Parameter names follow diffusers so that
checkpoints load as they are (`linear_1`, `net.0.proj`, ...)."""

from __future__ import annotations

import math

import torch
from torch import nn

from sgdiff.kernels import kernels_run_on
from sgdiff.models.fp8 import FP8, fp8_linear, quantize_weight
from sgdiff.models.lora import LowRank


class Linear(nn.Linear):
    """nn.Linear, with what the speed toggles chose for it (speed/fuse.py and speed/fp8.py set these;
    none by default), and the LoRA adapters kept beside it (sgdiff/lora/apply.py, unfused mode)."""

    gelu_epilogue: bool = False  # the tanh GELU that follows it computed in its GEMM's epilogue
    fused: FusedProjection | None = None  # on a group's first Linear: the group as one GEMM (`project`)
    fp8: bool = False  # `weight` is float8 e4m3 [N, K], with the buffer `weight_scale` (`to_fp8`)
    weight_scale: torch.Tensor  # float32 [N], one per output channel: a buffer, made by `to_fp8`
    # unfused LoRA adapters, added to every output (a submodule when set, so no class-level default:
    # nn.Module keeps submodules where a class attribute would shadow them)
    lora: LowRank | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            out = fp8_linear(x, self.weight, self.weight_scale, self.bias)
        else:
            out = nn.functional.linear(x, self.weight, self.bias)
        return out if self.lora is None else self.lora.add_to(out, x)

    def to_fp8(self, on: torch.device | None = None) -> None:
        """Store the weight as float8 e4m3 with a float32 scale per output channel (models/fp8.py), in
        place of the high-precision one (released, unless something else holds it); the bias stays. `on`:
        the device that computes the quantisation when it is not the weight's (offloading: the compute
        device, whose numbers an in-memory model gets); the float8 weight and its scales go back where the
        weight is."""
        home = self.weight.device
        weight, scale = quantize_weight(self.weight if on is None else self.weight.to(on))
        self.weight = nn.Parameter(weight.to(home), requires_grad=False)
        self.register_buffer("weight_scale", scale.to(home))
        self.fp8 = True


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm of q or k, with what the speed toggles chose for it."""

    rope_kernel: bool = False  # it and the rotary embedding after it as one Triton kernel (models/rope.py)
    # (a subclass's math: the normalised x rounded to the weight's dtype before the weight scales it, as
    # diffusers' own RMSNorm does; the kernel then rounds there too)
    round_normed: bool = False


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first. t: [B] -> [B, dim] (float32)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU (or tanh GELU) -> linear_2 (diffusers' TimestepEmbedding and text projections)."""

    def __init__(self, in_dim: int, dim: int, activation: str = "silu"):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        x = nn.functional.silu(x) if self.activation == "silu" else nn.functional.gelu(x, approximate="tanh")
        return self.linear_2(x)


def gelu_in_epilogue(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """tanh GELU of linear(x) as one GEMM: on CUDA cuBLASLt applies bias and GELU as it writes each
    tile (the wide MLP activation is written once, not written, read and written again). The CPU has
    no such epilogue (its _addmm_activation is the erf GELU): there the GELU runs in place."""
    flat = x.reshape(-1, x.shape[-1])  # [B, S, D_in] -> [B*S, D_in]
    if flat.is_cuda:
        out = torch._addmm_activation(linear.bias, flat, linear.weight.t(), use_gelu=True)
    else:
        out = torch.ops.aten.gelu_(torch.addmm(linear.bias, flat, linear.weight.t()), approximate="tanh")
    return out.view(*x.shape[:-1], out.shape[-1])


def gelu_projection(x: torch.Tensor, linear: Linear, approximate: str = "tanh") -> torch.Tensor:
    """GELU of linear(x); inside the GEMM when the fused-GELU toggle chose it for `linear` (speed/fuse.py),
    unless unfused LoRA adapters sit beside it (their sum must land before the GELU)."""
    if linear.gelu_epilogue and linear.lora is None:
        return gelu_in_epilogue(x, linear)
    return nn.functional.gelu(linear(x), approximate=approximate)


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner_dim: int, approximate: str = "tanh"):
        super().__init__()
        self.proj = Linear(dim, inner_dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_projection(x, self.proj, self.approximate)


class FeedForward(nn.Module):
    """GELU MLP stored as `net.0.proj` / `net.2`, as diffusers names it (tanh GELU by default)."""

    def __init__(self, dim: int, inner_dim: int | None = None, out_dim: int | None = None, approximate: str = "tanh"):
        super().__init__()
        inner_dim = inner_dim or 4 * dim
        self.net = nn.ModuleList(
            [GELUProjection(dim, inner_dim, approximate), nn.Identity(), Linear(inner_dim, out_dim or dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class LayerNormModulation(nn.Module):
    """A module whose outputs shift and scale a LayerNorm without affine parameters (adaLN, eps 1e-6),
    in the input's dtype: AdaModulation, or a model's own module of another layout (Qwen-Image's)."""

    norm_kernel: bool = False  # `modulate` as one Triton kernel (--enable-fused-norms; speed/fuse.py sets it)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """layer_norm(x) * (1 + scale) + shift with this module's shift and scale; one Triton kernel
        with --enable-fused-norms (bf16), rounding where the ops below round."""
        if self.norm_kernel and kernels_run_on(x) and x.dtype == torch.bfloat16:
            from sgdiff.kernels.norm_modulate import norm_modulate

            return norm_modulate(x, shift, scale, eps=1e-6, bf16_steps=True)
        return modulate(x, shift, scale)


class AdaModulation(LayerNormModulation):
    """SiLU -> Linear producing `chunks` modulation vectors from the conditioning [B, D]."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # emb: [B, D] -> chunks x [B, 1, D], ready to broadcast over the sequence
        return self.linear(nn.functional.silu(emb))[:, None, :].chunk(self.chunks, dim=-1)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters."""
    return nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x) * (1 + scale) + shift


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, returned in the input's dtype."""

    norm_kernel: bool = False  # `modulate` as one Triton kernel (--enable-fused-norms; speed/fuse.py sets it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, D]. With an affine weight and bias, one Triton kernel with --enable-fused-norms (bf16 x)."""
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        affine = weight is not None and bias is not None
        fits = x.dim() == 3 and x.dtype == torch.bfloat16 and kernels_run_on(x)
        if affine and self.norm_kernel and fits:
            from sgdiff.kernels.norm_modulate import norm_modulate

            return norm_modulate(x, bias, weight, eps=self.eps, bf16_steps=False, affine=True)  # (shift, scale)
        return nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(norm(x) * (1 + scale) + shift) in float32, back in x's dtype; shift, scale: float32
        [B, 1 or S, D]. One Triton kernel with --enable-fused-norms (bf16, no affine)."""
        plain = self.weight is None and self.bias is None  # type: ignore[unreachable]  # (torch: never None)
        if plain and self.norm_kernel and kernels_run_on(x) and x.dtype == torch.bfloat16:
            from sgdiff.kernels.norm_modulate import norm_modulate

            return norm_modulate(x, shift, scale, eps=self.eps, bf16_steps=False)
        return (self(x.float()) * (1 + scale) + shift).type_as(x)


class GatedResidual(nn.Module):
    """A block's gated residual update (Wan's): x + y * gate in float32, back in x's dtype. One Triton kernel
    with --enable-fused-norms (bf16 x and y; kernels/triton_gated_residual.py), except inside torch.compile,
    whose inductor fuses the expression itself."""

    kernel: bool = False  # speed/fuse.py sets it

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x, y: [B, S, D]; gate: float32 [B, 1 or S, D]."""
        bf16 = x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
        fits = bf16 and kernels_run_on(x)
        if self.kernel and fits and not torch.compiler.is_compiling():
            from sgdiff.kernels.triton_gated_residual import gated_residual

            return gated_residual(x, y, gate)
        return (x.float() + y.float() * gate).type_as(x)


class FusedProjection:
    """Several Linears over the same input as one GEMM: their weights (and biases) concatenated into
    one matrix, each Linear's own weight re-pointed at its slice (parameter names, and the state dict,
    stay as they were; no extra memory). Made by speed/fuse.py; `project` uses it. Linears with FP8
    weights (Linear.to_fp8) fuse too: their float8 rows and per-row scales concatenated alike."""

    def __init__(self, linears: tuple[Linear, ...]):
        if any(linear.bias is None for linear in linears):
            raise ValueError("FusedProjection fuses Linears that all have a bias")
        if len({linear.fp8 for linear in linears}) > 1:
            raise ValueError("FusedProjection fuses Linears whose weights have one precision")
        self.sizes = [linear.out_features for linear in linears]
        self.weight = cat_rows([linear.weight.detach() for linear in linears])  # [sum(out), in]
        self.bias = torch.cat([linear.bias.detach() for linear in linears])  # [sum(out)]
        # FP8: the rows' scales [sum(out)] (per output channel: the same as each Linear's own)
        self.scale = torch.cat([linear.weight_scale for linear in linears]) if linears[0].fp8 else None
        start = 0
        for linear, size in zip(linears, self.sizes, strict=True):
            linear.weight = nn.Parameter(self.weight[start : start + size], requires_grad=False)
            linear.bias = nn.Parameter(self.bias[start : start + size], requires_grad=False)
            if self.scale is not None:
                linear.weight_scale = self.scale[start : start + size]
            start += size

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each Linear's output without its unfused LoRA adapters (`project` adds those)."""
        if self.scale is not None:
            return fp8_linear(x, self.weight, self.scale, self.bias).split(self.sizes, dim=-1)
        return nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0; float8 ones as their bytes (a cat kernel of every device takes uint8)."""
    if tensors[0].dtype != FP8:
        return torch.cat(tensors)
    return torch.cat([t.view(torch.uint8) for t in tensors]).view(FP8)


def project(x: torch.Tensor, *linears: Linear) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to x: one GEMM when they were fused (a FusedProjection kept on the
    first of them), else one each; with each one's unfused LoRA adapters either way."""
    fused = linears[0].fused
    if fused is not None and len(fused.sizes) == len(linears):
        outs = fused(x)
        adapted = [linear.lora for linear in linears if linear.lora is not None]
        if not adapted:
            return outs
        hiddens = iter(shared_hidden(x, adapted))
        return tuple(
            out if linear.lora is None else linear.lora.add_to(out, x, next(hiddens))
            for out, linear in zip(outs, linears, strict=True)
        )
    return tuple(linear(x) for linear in linears)


def shared_hidden(x: torch.Tensor, loras: list[LowRank]) -> list[torch.Tensor]:
    """Each LowRank's hidden(x), from one GEMM over their stacked down projections (x read once for the
    whole group, not once per Linear): x [.., in] -> [.., R_i] each, column slices of one [.., sum R]."""
    if len(loras) == 1:
        return [loras[0].hidden(x)]
    down = torch.cat([lora.down for lora in loras])  # [sum R, in]
    scale = torch.cat([lora.scale for lora in loras])  # [sum R]
    hidden = nn.functional.linear(x, down) * scale  # [.., sum R]
    return list(hidden.split([lora.down.shape[0] for lora in loras], dim=-1))


def linear_over_concat(linear: nn.Linear, parts: list[torch.Tensor], split: bool) -> torch.Tensor:
    """linear(cat(parts, -1)). split: no concatenated copy; each part meets its columns of the weight
    in one GEMM, accumulated into the same output (the same sum, rounded once more per extra part)."""
    if not split:
        return linear(torch.cat(parts, dim=-1))
    out, start = None, 0
    for part in parts:
        width = part.shape[-1]
        flat, weight = part.reshape(-1, width), linear.weight[:, start : start + width]  # [B*S, w], [out, w]
        out = torch.addmm(linear.bias, flat, weight.t()) if out is None else out.addmm_(flat, weight.t())
        start += width
    if isinstance(linear, Linear) and linear.lora is not None:
        flat_parts = [part.reshape(-1, part.shape[-1]) for part in parts]  # [B*S, w] each
        out = linear.lora.add_to(out, flat_parts[0], linear.lora.hidden_over_concat(flat_parts))  # type: ignore[arg-type]  # [B*S, out]
    return out.view(*parts[0].shape[:-1], out.shape[-1])  # type: ignore[union-attr]  # (parts is never empty)
