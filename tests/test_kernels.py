"""sgdiff's Triton kernels, run on the CPU in Triton's interpreter, against the unfused path: the
q/k RMSNorm + RoPE kernel (per-head and all-head norms, joined streams, strided rows, head counts
and sizes that are not powers of 2), the LayerNorm + modulation kernel (FLUX's bf16 rounding,
Wan's float32 with per-token modulation), Wan's gated residual update, the head copy of Ulysses'
symmetric exchange and the ring's log-sum-exp merge (2 to 4 partials) alone and in the wave split's
attention, then inside tiny FLUX and Wan transformers (bit-identical outputs, each kernel called where it
should be). sgdiff/testing/kernel_checks.py."""

from __future__ import annotations

import os
import subprocess
import sys


def test_fused_norm_kernels_match_the_unfused_path():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sgdiff.testing.kernel_checks"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert sum("identical" in line for line in lines) == 9, done.stdout
    assert "copy_heads in the exchange of 4 ranks: identical" in done.stdout
    assert sum("partials" in line and "as the merge in torch" in line for line in lines) == 4, done.stdout
    assert sum("wave split" in line and "as one attention" in line for line in lines) == 2, done.stdout
    assert "FLUX, 19 modules marked, 8 + 11 + 0 kernel calls" in done.stdout
    # 2 blocks: each 2 adaLN norms, the cross-attention's affine norm and 2 gated residuals
    assert "Wan, 17 modules marked, 4 + 6 + 4 kernel calls" in done.stdout


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
