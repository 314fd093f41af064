"""sgdiff's Triton kernels, run on the CPU in Triton's interpreter, against the unfused path: the
q/k RMSNorm + RoPE kernel (per-head and all-head norms, joined streams, strided rows, head counts
and sizes that are not powers of 2), the LayerNorm + modulation kernel (FLUX's bf16 rounding,
Wan's float32 with per-token modulation), Wan's gated residual update, the head copy of Ulysses'
symmetric exchange and the ring's log-sum-exp merge (2 to 4 partials) alone and in the wave split's
attention, then inside tiny FLUX, Wan, HunyuanVideo and HunyuanVideo-1.5 transformers (bit-identical outputs,
each kernel called where it should be; HunyuanVideo's first block takes the patch embedding's transposed rows).
sgdiff/testing/kernel_checks.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_fused_norm_kernels_match_the_unfused_path():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sgdiff.testing.kernel_checks"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert sum("identical" in line for line in lines) == 11, done.stdout
    assert "copy_heads in the exchange of 4 ranks: identical" in done.stdout
    assert sum("partials" in line and "as the merge in torch" in line for line in lines) == 4, done.stdout
    assert sum("wave split" in line and "as one attention" in line for line in lines) == 2, done.stdout
    assert "FLUX, 19 modules marked, 8 + 11 + 0 kernel calls" in done.stdout
    # 2 blocks: each 2 adaLN norms, the cross-attention's affine norm and 2 gated residuals
    assert "Wan, 17 modules marked, 4 + 6 + 4 kernel calls" in done.stdout
    # 2 dual-stream blocks (4 adaLN norms each) and 2 single-stream ones, the output's norm; 1.5: 2 dual-stream
    assert "HunyuanVideo, 19 modules marked, 8 + 11 + 0 kernel calls: identical output" in done.stdout
    assert "HunyuanVideo-1.5, 13 modules marked, 4 + 9 + 0 kernel calls: identical output" in done.stdout


def test_signal_barrier_holds_every_rank_until_all_arrive():
    """Ranks as forked processes, the last one late every round: nobody passes a barrier before every
    rank's write is in, and each pad ends holding each peer's arrival count (2 barriers x 3 rounds)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sgdiff.testing.barrier_check"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exit codes [0, 0, 0]; values seen before they arrived [0, 0, 0]" in done.stdout, done.stdout
    assert "pads [[0, 6, 6], [6, 0, 6], [6, 6, 0]]" in done.stdout, done.stdout


def test_running_the_fused_kernels_eagerly_imports_no_compiler():
    """The kernels launch directly: torch.library's Triton ops (which import torch._dynamo and inductor,
    seconds in a fresh process) are registered only when something is compiled."""
    code = ("import sys, sgdiff.kernels.triton_norm_modulate, sgdiff.kernels.triton_qk_norm_rope; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_wan_kernels_compile_for_hopper():
    """The interpreter runs a kernel's Python, not its GPU build: compiled here for sm_90 (Triton's own ptxas,
    no GPU needed), the gated residual without FMA contraction (two roundings, as eager's two ops) and the
    LayerNorm kernel with and without its affine weight."""
    import triton  # (a test dependency on Linux x86-64, as for the interpreter's tests above)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sgdiff.kernels.triton_gated_residual import gated_residual_kernel
    from sgdiff.kernels.triton_norm_modulate import norm_modulate_kernel

    hopper = GPUTarget("cuda", 90, 32)
    rows = {"S": "i32", "N": "constexpr", "BLOCK": "constexpr"}
    residual = {f"{name}{part}": kind for name, kind in (("x", "bf16"), ("y", "bf16"), ("gate", "fp32"))
                for part, kind in (("_ptr", f"*{kind}"), ("_batch_stride", "i32"), ("_row_stride", "i32"))}  # fmt: skip
    residual = {**residual, "out_ptr": "*bf16", **rows}
    sizes = {"N": 1536, "BLOCK": 2048}
    built = triton.compile(ASTSource(gated_residual_kernel, residual, constexprs=sizes), target=hopper,
                           options={"num_warps": 4, "enable_fp_fusion": False})  # fmt: skip
    assert built.asm["cubin"] and "fma" not in built.asm["ptx"]
    norm = {"x_ptr": "*bf16", "x_batch_stride": "i32", "x_row_stride": "i32", "shift_ptr": "*fp32",
            "scale_ptr": "*fp32", "mod_batch_stride": "i32", "mod_row_stride": "i32", "out_ptr": "*bf16",
            "S": "i32", "eps": "fp32", "N": "constexpr", "BLOCK": "constexpr", "BF16_STEPS": "constexpr",
            "AFFINE": "constexpr"}  # fmt: skip
    for affine in (False, True):
        source = ASTSource(norm_modulate_kernel, norm, constexprs={**sizes, "BF16_STEPS": False, "AFFINE": affine})
        assert triton.compile(source, target=hopper, options={"num_warps": 4}).asm["cubin"]
