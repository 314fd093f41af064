"""Can this machine compile AOTInductor programs for CUDA (what `--torch-compile-mode ahead` needs on a GPU)?

AOTInductor compiles a C++ wrapper against CUDA's headers (found through CUDA_HOME, CUDA_PATH, nvcc or
/usr/local/cuda) and links `-lcuda`. Prints what this machine has, then compiles a small function as the
machine is and, where torch finds no CUDA_HOME, with the one sgdiff assembles from pip's nvidia headers and
the driver (speed/cuda_toolkit.py), and checks each program's output. Run on the GPU
machine: `python scripts/probes/aoti_cuda_check.py` (~1 min)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sgdiff.speed.cuda_toolkit import ensure_cuda_home, header_folders, loaded_driver


def facts() -> None:
    from torch.utils import cpp_extension

    print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name())
    print("CUDA_HOME (torch's search):", cpp_extension.CUDA_HOME, "| nvcc:", shutil.which("nvcc"))
    print("g++:", shutil.which("g++"), subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout[:40])
    print("pip headers:", header_folders(sys.path), "| driver loaded:", loaded_driver())
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    print("libcuda:", [line.strip() for line in ldconfig.splitlines() if "libcuda.so" in line][:3])


def compile_and_check(label: str) -> bool:
    class Block(torch.nn.Module):
        def forward(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(x @ weight.t()) * 2

    args = (torch.randn(64, 64, device="cuda"), torch.randn(8, 64, device="cuda"))
    started = time.perf_counter()
    try:
        exported = torch.export.export(Block(), args, strict=False)
        path = Path(tempfile.mkdtemp()) / "block.pt2"
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
        built = time.perf_counter() - started
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, torch.cuda.current_device())
        (out,) = loader.run(list(args))
        error = (out - Block()(*args)).abs().max().item()
        print(f"{label}: built in {built:.1f} s, max error {error:.2e}")
        return error < 1e-3
    except Exception as exc:  # noqa: BLE001 - a probe reports what failed
        print(f"{label}: FAILED after {time.perf_counter() - started:.1f} s: {type(exc).__name__}: {str(exc)[:400]}")
        return False


def main() -> None:
    facts()
    if compile_and_check("as the machine is"):
        return
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        home = ensure_cuda_home()  # what sgdiff's ahead compile does before building on a GPU
        print("assembled CUDA_HOME:", home)
        if home is not None:
            compile_and_check("with the assembled CUDA_HOME")


if __name__ == "__main__":
    main()
