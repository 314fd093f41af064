"""sgdiff's Triton kernels, run on the CPU in Triton's interpreter, against the unfused path: the
q/k RMSNorm + RoPE kernel alone (per-head and all-head norms, joined streams, strided rows, head
counts and sizes that are not powers of 2) and inside tiny FLUX and Wan transformers (bit-identical
outputs, the kernel called for q and k of every block). sgdiff/testing/kernel_checks.py."""

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
    assert sum("identical" in line for line in lines) == 5, done.stdout
    assert "FLUX, 12 norms marked, 8 kernel calls" in done.stdout
    assert "Wan, 8 norms marked, 4 kernel calls" in done.stdout
