"""Can this machine compile AOTInductor programs for CUDA (what `--torch-compile-mode ahead` needs on a GPU)?

AOTInductor compiles a C++ wrapper against CUDA's headers (found through CUDA_HOME, CUDA_PATH, nvcc or
/usr/local/cuda) and links `-lcuda`. Prints what this machine has, then compiles a small function both as the
machine is and, where CUDA_HOME is missing, with a CUDA_HOME assembled from pip's nvidia packages (their
headers, libcuda.so linked to the driver's libcuda.so.1), and checks each program's output. Run on the GPU
machine: `python scripts/probes/aoti_cuda_check.py` (~1 min)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def facts() -> None:
    from torch.utils import cpp_extension

    print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name())
    print("CUDA_HOME (torch's search):", cpp_extension.CUDA_HOME, "| nvcc:", shutil.which("nvcc"))
    print("g++:", shutil.which("g++"), subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout[:40])
    print("pip headers:", pip_headers())
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    print("libcuda:", [line.strip() for line in ldconfig.splitlines() if "libcuda.so" in line][:3])


def pip_headers() -> list[str]:
    found = []
    for site in sys.path:
        found += glob.glob(os.path.join(site, "nvidia", "**", "include", "cuda_runtime_api.h"), recursive=True)
    return found


def assembled_cuda_home() -> str | None:
    """A folder with include/ (pip's CUDA headers, merged) and lib64/libcuda.so (the driver's)."""
    headers = pip_headers()
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    drivers = [line.split("=>")[-1].strip() for line in ldconfig.splitlines() if "libcuda.so.1" in line]
    if not headers or not drivers:
        return None
    home = Path(tempfile.mkdtemp(prefix="cuda-home-"))
    (home / "include").mkdir()
    (home / "lib64").mkdir()
    for header_dir in {str(Path(h).parent) for h in headers}:
        for item in Path(header_dir).iterdir():
            target = home / "include" / item.name
            if not target.exists():
                target.symlink_to(item)
    (home / "lib64" / "libcuda.so").symlink_to(drivers[0])
    return str(home)


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
        home = assembled_cuda_home()
        print("assembled CUDA_HOME:", home)
        if home is not None:
            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home
            compile_and_check("with the assembled CUDA_HOME")


if __name__ == "__main__":
    main()
