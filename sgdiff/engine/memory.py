"""Whether a request can fit in the CPU's memory, judged before anything is allocated: what the weights
take once loaded (from the safetensors headers: element counts in the dtype they will have), times the
processes that each hold a copy, plus the least the request's own activations take (the model family's
floor: e.g. the VAE's full-resolution feature maps). A run that surely cannot fit is refused with the
numbers, instead of being killed by the kernel's OOM killer without a word.

Only the CPU: there, running out of memory ends the process with SIGKILL and nothing said. On a GPU
torch raises an out-of-memory error, which the CLI turns into one line (cli/errors.py); only what surely
cannot fit on one GPU, the transformers as the offload mode leaves them, is refused before loading
(offload/memory.py). `--gpu-memory-limit` caps what a process may allocate on its GPU (cap_gpu_memory), to
prove that a run fits a smaller card."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sgdiff.errors import UserError
from sgdiff.models.fast_load import read_header
from sgdiff.models.loading import safetensors_files
from sgdiff.sampling import SamplingParams

GIB = 2**30


def available_memory_bytes(field: str = "MemAvailable") -> int | None:
    """The memory the kernel can give now without swapping (MemAvailable of /proc/meminfo; MemTotal: all
    of it); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def loaded_weight_bytes(model_dir: Path, model_index: dict, dtype: torch.dtype, skip: frozenset[str]) -> int:
    """Bytes the components' weights take once loaded: floating-point tensors in `dtype`, the others as
    stored; `skip` names components not loaded. Reads the headers only."""
    return sum(sum(tensors.values()) for tensors in tensor_bytes(model_dir, model_index, dtype, skip).values())


def tensor_bytes(
    model_dir: Path, model_index: dict, dtype: torch.dtype, skip: frozenset[str]
) -> dict[str, dict[str, int]]:
    """{component: {tensor name: bytes once loaded}} (as loaded_weight_bytes counts them), for the components
    with weights that are loaded."""
    found: dict[str, dict[str, int]] = {}
    for name, entry in model_index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, list):
            continue
        folder = model_dir / name
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            continue
        tensors = found[name] = {}
        for path in safetensors_files(folder):
            for tensor, (stored, shape, begin, end) in read_header(path)[1].items():
                count = 1
                for size in shape:
                    count *= size
                tensors[tensor] = count * dtype.itemsize if stored.is_floating_point else end - begin
    return found


def check_fits_in_memory(
    weights: int,
    activations: int,
    params: SamplingParams,
    processes: int,
    available: int | None,
    having: str = "{} are available",
) -> None:
    """Refuse a request whose weights still to load (`weights`: every process's copy together; 0 once
    loaded, when they are no longer in what is available) and activation floor exceed the memory
    available now (`having`: how the message says `available`, e.g. "this machine has {}": all the memory,
    which a loaded engine compares with, as a running request's memory comes back when it ends)."""
    if available is None:
        return
    needed = weights + activations
    if needed <= available:
        return
    copies = f" in {processes} processes" if processes > 1 else ""
    raise UserError(
        f"this request needs at least {size(needed)} of memory on the CPU ({size(weights)} of weights{copies}, "
        f"{size(activations)} for a {params.height}x{params.width} output's activations) but "
        f"{having.format(size(available))}: lower `height` and `width`"
        + (", or `num_gpus`" if processes > 1 else "")
        + ", or run it on a GPU",
        field="height",
    )


def size(count: int) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.0f} MiB"


SIZE_UNITS = {"gib": 2**30, "g": 2**30, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}


def parse_size(text: str, field: str) -> int:
    """Bytes of a size as people write it: 24GiB, 24G (GiB), 24GB (10^9), 500MiB, 1.5GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text)
    unit = SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None or float(match.group(1)) <= 0:
        raise UserError(f"`{field}` takes a size such as 24GiB, 24GB or 500MiB, got {text!r}", field=field)
    return int(float(match.group(1)) * unit)


def check_gpu_memory_limit(device: torch.device, limit: int | None) -> None:
    """Refuse a cap where there is no CUDA GPU to cap (before anything loads; no CUDA call)."""
    if limit is not None and device.type != "cuda":
        raise UserError(
            f"`gpu_memory_limit` caps a CUDA GPU's memory, but this run is on the {device.type}: drop it",
            field="gpu_memory_limit",
        )


def cap_gpu_memory(device: torch.device, limit: int | None) -> int | None:
    """Let this process allocate at most `limit` bytes of `device` (torch.cuda.set_per_process_memory_fraction:
    beyond it an allocation fails as on a smaller GPU, so a run that fits under the cap fits such a GPU).
    Returns the GPU's memory as the process sees it (None: not capped)."""
    if limit is None:
        return None
    check_gpu_memory_limit(device, limit)
    total = torch.cuda.get_device_properties(device).total_memory
    if limit > total:
        raise UserError(
            f"`gpu_memory_limit` {size(limit)} is more than the GPU's {size(total)}", field="gpu_memory_limit"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()  # ("cuda": the current one)
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    return limit
