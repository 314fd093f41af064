"""On a GPU: sgdiff's safetensors reader (models/fast_load.py) against safe_open + .to(cuda) per tensor
(the loader before it) on one file of bf16 weights, page cache warm; the tensors must be equal. Also
the reader with other thread counts and chunk sizes, and the CUDA allocations alone.

    python scripts/probes/load_speed.py [--gb 8 | --path FILE] [--variants 8x32,16x32,8x64]"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sgdiff.models import fast_load  # noqa: E402


def timed(work) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = work()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def read_with(readers: int, chunk_mb: int, path: Path) -> dict[str, torch.Tensor]:
    fast_load.READERS, fast_load.CHUNK_BYTES = readers, chunk_mb * 2**20
    with fast_load.Reader(torch.device("cuda")) as reader:
        return fast_load.read_safetensors(path, reader)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=8.0)
    parser.add_argument("--path", type=Path, default=Path("/tmp/load_speed.safetensors"))
    parser.add_argument("--variants", default="8x32,16x32,8x64,16x16,4x64")  # reader threads x chunk MB
    args = parser.parse_args()
    device = torch.device("cuda")
    if not args.path.exists():
        count = int(args.gb * 1e9 / (3072 * 12288 * 2))
        weights = {f"blocks.{i}.weight": torch.randn(3072, 12288, dtype=torch.bfloat16) for i in range(count)}
        save_file(weights, args.path)
        del weights
    size = os.path.getsize(args.path) / 1e9
    os.system(f"cat {args.path} > /dev/null")  # the page cache holds it (as a second load would find it)
    _, entries = fast_load.read_header(args.path)
    print(f"{torch.cuda.get_device_name()}: {args.path.name}, {size:.1f} GB, {len(entries)} tensors, page cache warm")

    seconds, _ = timed(lambda: [torch.empty(s, dtype=d, device=device) for d, s, _, _ in entries.values()])
    torch.cuda.empty_cache()
    print(f"  CUDA allocations alone              {seconds:6.2f} s")
    seconds, old = timed(lambda: read_old(args.path, device))
    torch.cuda.empty_cache()
    print(f"  safe_open + .to(cuda) per tensor    {seconds:6.2f} s  {size / seconds:5.1f} GB/s")
    for variant in args.variants.split(","):
        readers, chunk_mb = (int(x) for x in variant.split("x"))
        seconds, new = timed(lambda: read_with(readers, chunk_mb, args.path))  # noqa: B023
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old), "the tensors differ"
        del new
        torch.cuda.empty_cache()
        rate = f"{seconds:6.2f} s  {size / seconds:5.1f} GB/s"
        print(f"  sgdiff, {readers:2} lanes x {chunk_mb:3} MB chunks   {rate}  (equal)")


def read_old(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt", device="cpu") as shard:
        return {name: shard.get_tensor(name).to(device) for name in shard.keys()}  # noqa: SIM118


if __name__ == "__main__":
    main()
