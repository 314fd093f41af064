"""FlashAttention against cuDNN on the GPU, attention alone (issue 27, item 10): at FLUX.1-dev 1024² and
Wan2.1 832x480x81 shapes, bf16, the agreement of each kernel with a float32 reference (the first 4
heads, SDPA's memory-efficient kernel in float32) and with each other, their ms per call and TFLOP/s
(4·S²·D·H), timed in turns with CUDA events, and what `--attention-backend auto` picks at each shape.

    python scripts/probes/flash_attention_check.py [--json out.json] [--shapes flux-1024 wan-1.3b ...]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]  # sgdiff from this checkout

from sgdiff.speed.attention_backends import attention_backend, sdpa_only  # noqa: E402
from sgdiff.speed.auto_attention import cuda_ms  # noqa: E402
from sgdiff.speed.wave_split import wave_split_attention  # noqa: E402
from sgdiff.testing.compare import relative_error  # noqa: E402

SHAPES = {  # name: (B, S, H, D), q, k and v alike
    "flux-1024": (1, 4096 + 512, 24, 128),  # FLUX.1-dev 1024²: 4096 image + 512 text tokens
    "flux-1024-ulysses2": (1, 4096 + 512, 12, 128),  # each rank's heads under Ulysses-2 (the wave split's case)
    "wan-1.3b": (1, 32760, 12, 128),  # Wan2.1-T2V-1.3B 832x480x81: 21 x 30 x 52 latent tokens
    "wan-14b": (1, 32760, 40, 128),
}
WARMUP, ROUNDS, CALLS = 3, 10, 5
REFERENCE_HEADS = 4


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-core", "flash-attn",
                 "quack-kernels", "apache-tvm-ffi"):  # fmt: skip
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cudnn"] = str(torch.backends.cudnn.version())
    found["gpu"] = torch.cuda.get_device_name()
    return found


def ms_per_call(fn) -> float:
    return cuda_ms(fn, CALLS)


def check_shape(name: str, kernels: dict) -> dict:
    b, s, h, d = SHAPES[name]
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    few = [t[:, :, :REFERENCE_HEADS].float() for t in (q, k, v)]
    reference = sdpa_only(SDPBackend.EFFICIENT_ATTENTION)(*few)
    result: dict = {"shape": [b, s, h, d], "rel_err_vs_fp32": {}, "ms": {}, "tflops": {}}
    outputs = {}
    for kernel, fn in kernels.items():
        for _ in range(WARMUP):  # FA4 compiles its kernel at the first call
            outputs[kernel] = fn(q, k, v)
        result["rel_err_vs_fp32"][kernel] = relative_error(outputs[kernel][:, :, :REFERENCE_HEADS], reference)
    if "fa" in outputs:
        result["rel_err_fa_vs_cudnn"] = relative_error(outputs["fa"], outputs["cudnn (auto without FA)"])
    times: dict[str, list[float]] = {kernel: [] for kernel in kernels}
    for _ in range(ROUNDS):
        for kernel, fn in kernels.items():
            times[kernel].append(ms_per_call(lambda fn=fn: fn(q, k, v)))
    for kernel, t in times.items():
        result["ms"][kernel] = statistics.median(t)
        result["tflops"][kernel] = 4 * s * s * d * h * b / (result["ms"][kernel] / 1e3) / 1e12
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    device, bf16 = torch.device("cuda"), torch.bfloat16
    report: dict = {"versions": versions(), "shapes": {}}
    print(report["versions"], flush=True)
    kernels = {"cudnn (auto without FA)": wave_split_attention, "cudnn plain": sdpa_only(SDPBackend.CUDNN_ATTENTION)}
    try:
        kernels["fa"] = attention_backend("fa", device, bf16)
        report["fa_kernel"] = kernels["fa"].__name__
        auto = attention_backend("auto", device, bf16)
        kernels["auto"] = auto
    except Exception as exc:  # noqa: BLE001 - a probe: report what failed and time the rest
        report["fa_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        auto = None
    print(f"kernels: {list(kernels)}; fa: {report.get('fa_kernel', report.get('fa_error'))}", flush=True)
    for name in args.shapes:
        try:
            report["shapes"][name] = check_shape(name, kernels)
        except Exception as exc:  # noqa: BLE001
            report["shapes"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        print(name, json.dumps(report["shapes"][name]), flush=True)
    report["auto_choices"] = auto.choices() if hasattr(auto, "choices") else None
    print("auto's choices:", json.dumps(report["auto_choices"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\n{'shape':22} {'kernel':26} {'ms':>8} {'TFLOP/s':>8} {'rel err fp32':>12}")
    for name, r in report["shapes"].items():
        for kernel, ms in r.get("ms", {}).items():
            print(f"{name:22} {kernel:26} {ms:8.3f} {r['tflops'][kernel]:8.0f} {r['rel_err_vs_fp32'][kernel]:12.2e}")
        if "rel_err_fa_vs_cudnn" in r:
            print(f"{name:22} fa vs cudnn rel err {r['rel_err_fa_vs_cudnn']:.2e}")


if __name__ == "__main__":
    main()
