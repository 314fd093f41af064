"""FlashAttention behind `--attention-backend fa`, and the kernel `auto` measures against cuDNN where one is
installed (speed/auto_attention.py).

Three generations, each its own package; each takes q, k, v [B, S, H, D] as they are, in float16 or
bfloat16 on a CUDA GPU, and `fa` runs the newest one installed that runs on the GPU:
- FA4, PyPI `flash-attn-4` (`pip install 'sgdiff[flash]'`), imported as flash_attn.cute: kernels written
  in NVIDIA's CuTe DSL (PyPI `nvidia-cutlass-dsl`, whose libs-core wheel holds `cutlass.cute`) for
  Hopper (9.x) and Blackwell (10.x), compiled at the first call of each head dim and dtype (seconds), and
  kept in FA4's own disk cache, which sgdiff turns on in the user's cache (use_cute_cache): a later process
  loads them. flash_attn_func(q, k, v) returns (out, lse), lse None unless asked for.
- FA3, flash_attn_interface (built from the flash-attention repository's hopper/ folder; no wheel on
  PyPI): Hopper. Also `--attention-backend fa3` on its own.
- FA2, PyPI `flash-attn`, imported as flash_attn (its compiled part is the top-level flash_attn_2_cuda):
  Ampere (8.x) and newer. PyPI holds only its source, whose install downloads a prebuilt wheel from
  GitHub where one matches torch, CUDA and Python, else compiles for hours: not in the extra.
  flash_attn_func(q, k, v) returns out.
Inside a torch.compile trace the call is one opaque op (sgdiff::flash_attention): FA4 launches its kernels
from Python that dynamo cannot trace.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch

from sgdiff.cache import cache_root
from sgdiff.errors import UserError
from sgdiff.models.attention import AttentionImpl

DTYPES = (torch.float16, torch.bfloat16)
INSTALL = "pip install 'sgdiff[flash]'"


@dataclass(frozen=True)
class FlashKernel:
    name: str  # fa4, fa3, fa2
    module: str  # the module whose flash_attn_func runs it
    marker: str  # the module whose presence says the package is installed (found without loading CUDA code)
    majors: tuple[int, ...]  # the compute capability majors it runs on
    distribution: str  # the package that installs it (its version keys auto's picks kept on disk)


KERNELS = (  # newest first: `fa` takes the first that is installed and runs on the GPU
    FlashKernel("fa4", "flash_attn.cute", "flash_attn.cute", (9, 10), "flash-attn-4"),
    FlashKernel("fa3", "flash_attn_interface", "flash_attn_interface", (9,), "flash_attn_3"),
    FlashKernel("fa2", "flash_attn", "flash_attn_2_cuda", (8, 9, 10, 11, 12), "flash-attn"),
)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, OSError):  # a parent that is no package or fails to load; no spec
        return False


def installed_kernels() -> list[FlashKernel]:
    return [kernel for kernel in KERNELS if installed(kernel.marker)]


def kernel_for(device: torch.device, dtype: torch.dtype) -> FlashKernel | None:
    """The newest installed FlashAttention that runs on `device` in `dtype`; None if there is none."""
    if device.type != "cuda" or dtype not in DTYPES:
        return None
    found = installed_kernels()  # (before the GPU is asked: nothing installed, nothing asked)
    major = torch.cuda.get_device_capability(device)[0] if found else None
    return next((kernel for kernel in found if major in kernel.majors), None)


def check_flash(device: torch.device, dtype: torch.dtype) -> FlashKernel:
    """The kernel `--attention-backend fa` runs on this device and dtype, imported; else a one-line UserError.
    No kernel is launched here: FA4 would compile one for the probe's shapes first."""
    found = installed_kernels()
    if not found:
        raise fa_error(f"needs FlashAttention, which is not installed: {INSTALL} (FlashAttention 4, for Hopper and "
                       "Blackwell GPUs), or use auto")  # fmt: skip
    names = ", ".join(kernel.name for kernel in found)
    if device.type != "cuda":
        raise fa_error(f"runs FlashAttention ({names}) on CUDA GPUs; the model runs on {device.type}: use auto")
    if dtype not in DTYPES:
        dtype_name = str(dtype).removeprefix("torch.")
        raise fa_error(f"runs in float16 or bfloat16; the model runs in {dtype_name}: use auto")
    kernel = kernel_for(device, dtype)
    if kernel is None:
        major, minor = torch.cuda.get_device_capability(device)
        raise fa_error(f"has no FlashAttention for this GPU (compute capability {major}.{minor}) in {names}: FA4 "
                       "runs on 9.x and 10.x, FA2 (pip install flash-attn) on 8.x and newer; or use auto")  # fmt: skip
    try:
        import_kernel(kernel.module)
    except (ImportError, OSError, RuntimeError) as exc:  # its own parts missing (FA4 without cutlass.cute)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fa_error(f"found {kernel.name}, which cannot be imported ({reason}): {INSTALL}, or use auto") from exc
    return kernel


def fa_error(message: str) -> UserError:
    return UserError(f"`attention_backend` fa {message}", field="attention_backend")


@cache  # one function per kernel: the CUDA graphs' keys hold it
def flash_attention(kernel: FlashKernel) -> AttentionImpl:
    """`kernel` as an AttentionImpl: q, k, v [B, S, H, D] -> [B, S, H, D]."""

    def impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.sgdiff.flash_attention(q, k, v, kernel.module)
        return run_flash(kernel.module, q, k, v)

    impl.__name__ = kernel.name
    return impl


def run_flash(module: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = import_kernel(module).flash_attn_func(q, k, v)  # FA4 (and older FA3): (out, lse)
    return out[0] if isinstance(out, tuple) else out


def import_kernel(module: str) -> ModuleType:
    """The kernel's module; FA4's with its disk cache of compiled kernels on (use_cute_cache)."""
    if module == "flash_attn.cute" and module not in sys.modules:
        use_cute_cache()
    return importlib.import_module(module)


def use_cute_cache() -> None:
    """FA4 compiles each kernel at its first call in every process (seconds) unless its own disk cache is on
    (read when flash_attn.cute is imported): on, in the user's cache, unless the user set it otherwise."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(cache_root() / "flash-attention-cute"))


@torch.library.custom_op("sgdiff::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module: str) -> torch.Tensor:
    """run_flash as an op a compiled graph calls without looking inside (its output is a new tensor)."""
    return run_flash(module, q, k, v)


@flash_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module: str) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))  # [B, S, H, D_v]
