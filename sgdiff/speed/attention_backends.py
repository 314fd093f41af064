"""The attention kernels behind models/attention.py's one entry point, by name (--attention-backend).

Each is an AttentionImpl: q, k, v [B, S, H, D] -> [B, S, H, D]. `auto` is the fastest correct kernel
this device has: cuDNN's fused attention on Hopper and newer (about 1.7x SDPA's flash there,
docs/benchmarks.md; split at tile waves where its last wave would be thin: speed/wave_split.py),
else SDPA's own choice; where FlashAttention is installed, that or FlashAttention, whichever is measured
faster at each shape (speed/auto_attention.py). Optional kernels (FlashAttention: `fa`, the newest one
installed for the GPU, speed/flash_attention.py; `fa3`; SageAttention) are used only when installed; asking
for one that is missing or cannot run here is a one-line error.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sgdiff.errors import UserError
from sgdiff.models.attention import AttentionImpl, sdpa_attention
from sgdiff.speed.wave_split import wave_split_attention


def sdpa_only(backend: SDPBackend) -> AttentionImpl:
    """SDPA restricted to one of its kernels (an error, not a silent fallback, when it cannot run)."""

    def impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] -> [B, H, S, D]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    impl.__name__ = f"sdpa_{backend.name.lower()}"
    return impl


def sdpa_default(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with PyTorch's own kernel choice."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@cache
def compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's flex attention (Triton, compiled once per shape), no mask."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return compiled_flex_attention()(q, k, v).transpose(1, 2)


def flash3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 3 (Hopper), package flash_attn_interface; takes [B, S, H, D] as it is."""
    out = importlib.import_module("flash_attn_interface").flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention (8-bit QK), package sageattention; "NHD" is [B, S, H, D]."""
    return importlib.import_module("sageattention").sageattn(q, k, v, tensor_layout="NHD")


BACKENDS: dict[str, AttentionImpl] = {
    "sdpa": sdpa_default,
    "cudnn": sdpa_only(SDPBackend.CUDNN_ATTENTION),
    "flash": sdpa_only(SDPBackend.FLASH_ATTENTION),
    "efficient": sdpa_only(SDPBackend.EFFICIENT_ATTENTION),
    "math": sdpa_only(SDPBackend.MATH),
    "flex": flex,
    "fa3": flash3,
    "sage": sage,
}
OPTIONAL_PACKAGES = {"fa3": "flash_attn_interface", "sage": "sageattention"}
CHOICES = ("auto", "fa", *BACKENDS)  # auto and fa: a kernel for the device (attention_backend)


def check_backend_name(name: str) -> None:
    if name not in CHOICES:
        raise UserError(f"`attention_backend` {name!r} is not one of: {', '.join(CHOICES)}", field="attention_backend")


def attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionImpl:
    """The kernel `name` names, checked to run on this device and dtype with a tiny probe (`fa`: by what is
    installed and the GPU, speed/flash_attention.py)."""
    check_backend_name(name)
    if name == "auto":  # cuDNN first on CUDA (split at tile waves where that helps), SDPA's choice on the CPU
        return auto_attention(device, dtype)
    if name == "fa":
        from sgdiff.speed.flash_attention import check_flash, flash_attention

        return flash_attention(check_flash(device, dtype))
    package = OPTIONAL_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(
            f"`attention_backend` {name} needs the {package} package, which is not installed; use auto",
            field="attention_backend",
        )
    impl = BACKENDS[name]
    q = torch.randn(1, 8, 2, 64, device=device, dtype=dtype)
    try:
        impl(q, q, q)
    except RuntimeError as exc:  # SDPA: "No viable backend ..."; the traceback with SGDIFF_DEBUG=1
        dtype_name = str(dtype).removeprefix("torch.")
        raise UserError(
            f"`attention_backend` {name} cannot run on {device.type} in {dtype_name}; use auto or another backend",
            field="attention_backend",
        ) from exc
    return impl


def auto_attention(device: torch.device, dtype: torch.dtype) -> AttentionImpl:
    """`auto`: SDPA's choice on the CPU; on CUDA cuDNN split at tile waves, measured against FlashAttention at
    each shape where a FlashAttention for this GPU is installed (speed/auto_attention.py)."""
    if device.type != "cuda":
        return sdpa_attention
    from sgdiff.speed.flash_attention import kernel_for

    kernel = kernel_for(device, dtype)
    if kernel is None:
        return wave_split_attention
    from sgdiff.speed.attention_picks import pick_store
    from sgdiff.speed.auto_attention import MeasuredAttention
    from sgdiff.speed.flash_attention import flash_attention

    candidates = {"cudnn": wave_split_attention, kernel.name: flash_attention(kernel)}
    return MeasuredAttention(candidates, store=pick_store(device, kernel.distribution))
