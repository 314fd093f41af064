"""FP8 weights for the transformer (--dit-precision fp8): the Linears of its repeated blocks store their
weights as float8 e4m3 with a float32 scale per output channel, and run their matmuls on the FP8 tensor
cores (models/fp8.py has the math; models/layers.py Linear.to_fp8 converts one). Half the bytes of
those weights (the bf16 ones are released: FLUX.1-dev's transformer 22.2 -> 11.2 GiB), and on an H100
a dense FP8 GEMM ran at 1417 TFLOP/s against 796 for bf16. Lossy: each matmul's inputs are rounded
to 4 significant bits (e4m3: 3 stored); one such Linear moves its output by ~3.7e-2 on random data.

Which Linears: every Linear inside the model's repeated blocks (speed/compile.py repeated_blocks): the
attention projections, the MLPs, and the adaLN modulation of FLUX's and Qwen-Image's blocks (27% of
FLUX.1-dev's weights: without them the transformer would keep 64% of its bytes, not half); where their
sizes suit torch._scaled_mm (in and out features multiples of 16: every full-size model's are). The
embedders, the output norm's modulation and the output projection stay in the model's dtype: few
weights (0.6% of FLUX.1-dev's), the first and last layers, where an error reaches the latents
unaveraged. Measured on the embedded demo models (CPU, emulated): one forward moves by 3.3e-2 (demo
image; 2.6e-2 with its modulation kept) and 7.1e-2 (demo video) from the unquantised model, and both
pass their held-out quality checks (tests/test_fp8_weights.py)."""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.errors import UserError
from sgdiff.models.layers import Linear
from sgdiff.speed.compile import repeated_blocks

DIT_PRECISIONS = ("default", "fp8")  # SpeedConfig.dit_precision (the CLI's choices: a test keeps them equal)
FP8_CAPABILITY = (8, 9)  # Ada (8.9), Hopper (9.0) and newer have FP8 tensor cores


def fp8_linears(model: nn.Module) -> list[Linear]:
    """The Linears of `model` whose weights --dit-precision fp8 stores in float8 (see above)."""
    return [
        module
        for block in repeated_blocks(model)
        for module in block.modules()
        if isinstance(module, Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
    ]


def use_fp8_weights(model: nn.Module, device: torch.device | None = None) -> int:
    """Convert fp8_linears(model) in place (before fusing projections: a fused group then concatenates
    the float8 rows and their scales); returns how many. `device`: where the model computes; a CUDA GPU
    quantises weights that wait in CPU memory (offloading), one Linear at a time (FLUX.1-dev's 22 GB: a CPU
    took ~19 s, run HF), and their float8 copies go back there: the bytes a model in GPU memory gets."""
    linears = fp8_linears(model)
    on = device if device is not None and device.type == "cuda" else None
    for linear in linears:
        if linear.gelu_epilogue:
            raise ValueError("a Linear with a GELU epilogue (fused_gelu) runs a bf16 GEMM; it has no FP8 form")
        linear.to_fp8(on)
    return len(linears)


def check_fp8(device: torch.device, dtype: torch.dtype) -> None:
    """A UserError where FP8 matmuls cannot run: not a CUDA GPU of compute capability 8.9 or newer, or a
    model not in bfloat16 (the row-wise scaled matmul writes bf16). The CPU is refused too: there the
    math is only emulated (models/fp8.py, for the tests), slower than the plain model."""
    needs = "FP8 tensor cores: a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)"
    if device.type != "cuda":
        raise UserError(
            f"`dit_precision` fp8 needs {needs}; the model runs on {device.type}: drop `dit_precision`",
            field="dit_precision",
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise UserError(
            f"`dit_precision` fp8 needs {needs}; this {name} has compute capability "
            f"{capability[0]}.{capability[1]}: drop `dit_precision`",
            field="dit_precision",
        )
    if dtype != torch.bfloat16:
        dtype_name = str(dtype).removeprefix("torch.")
        raise UserError(
            f"`dit_precision` fp8 computes in bfloat16; the model runs in {dtype_name}: "
            "drop `dtype` or `dit_precision`",
            field="dit_precision",
        )
