"""A CUDA_HOME for AOTInductor on a machine without a CUDA toolkit (speed/precompile.py).

AOTInductor compiles its CUDA wrapper against CUDA's headers, which torch looks for through CUDA_HOME,
CUDA_PATH, nvcc or /usr/local/cuda, and links it with `-lcuda`. A machine whose CUDA came with pip (torch's
nvidia-* packages: their include/ folders hold the runtime's headers) and the driver (libcuda.so.1) has both
pieces, under other names: this assembles them as a CUDA_HOME in sgdiff's cache, symlinks only."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from sgdiff.cache import cache_root

HEADER = "cuda_runtime_api.h"


def header_folders(search: list[str]) -> list[Path]:
    """The include/ folders of pip's nvidia packages on `search` (sys.path) that hold CUDA's runtime headers."""
    found: list[Path] = []
    for site in search:
        nvidia = Path(site) / "nvidia"
        if nvidia.is_dir():
            found += sorted(header.parent for header in nvidia.glob(f"**/include/{HEADER}"))
    return found


def loaded_driver(maps: Path = Path("/proc/self/maps")) -> Path | None:
    """The CUDA driver library this process loaded (torch loads it with its first CUDA call)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    mapped = [line.split()[-1] for line in lines if len(line.split()) >= 6]  # (address, perms, ..., path)
    paths = {path for path in mapped if Path(path).name.startswith("libcuda.so")}
    return Path(min(paths)) if paths else None  # (the driver's own file, e.g. libcuda.so.570.86.15)


def assemble(headers: list[Path], driver: Path, root: Path) -> Path:
    """A folder under `root` with include/ (every file of `headers`, the first folder winning a name) and
    lib64/libcuda.so (`driver`)."""
    key = hashlib.sha256(repr(([str(h) for h in headers], str(driver))).encode()).hexdigest()[:16]
    home = root / f"cuda-home-{key}"
    if (home / "lib64" / "libcuda.so").exists():
        return home
    partial = root / f"cuda-home-{key}.{os.getpid()}.partial"
    (partial / "include").mkdir(parents=True, exist_ok=True)
    (partial / "lib64").mkdir(exist_ok=True)
    for folder in headers:
        for item in folder.iterdir():
            link = partial / "include" / item.name
            if not link.exists():
                link.symlink_to(item)
    (partial / "lib64" / "libcuda.so").symlink_to(driver)
    try:
        partial.rename(home)
    except OSError:  # another process assembled it meanwhile
        pass
    return home


def ensure_cuda_home() -> str | None:
    """CUDA_HOME as torch found it, else one assembled from pip's headers and the loaded driver (set for this
    process); None where neither exists (AOTInductor then fails, and the kind runs just in time)."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        return cpp_extension.CUDA_HOME
    headers, driver = header_folders(sys.path), loaded_driver()
    if not headers or driver is None:
        return None
    home = str(assemble(headers, driver, cache_root()))
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # read by torch's include and library paths
    return home
