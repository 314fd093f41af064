"""On a GPU: sgdiff's safetensors reader (models/fast_load.py) against safe_open + .to(cuda) per tensor
(the loader before it) on one file of bf16 weights, page cache warm; the tensors must be equal.

    python scripts/probes/load_speed.py [--gb 8]"""

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

from sgdiff.models.fast_load import Reader, read_safetensors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=8.0)
    parser.add_argument("--path", type=Path, default=Path("/tmp/load_speed.safetensors"))
    args = parser.parse_args()
    device = torch.device("cuda")
    count = int(args.gb * 1e9 / (3072 * 12288 * 2))
    weights = {
        f"blocks.{i}.weight": torch.randn(3072, 12288, device=device, dtype=torch.bfloat16) for i in range(count)
    }
    save_file({k: v.cpu() for k, v in weights.items()}, args.path)
    del weights
    size = os.path.getsize(args.path) / 1e9
    os.system(f"cat {args.path} > /dev/null")  # the page cache holds it (as a second load would find it)

    torch.cuda.synchronize()
    start = time.perf_counter()
    with safe_open(args.path, framework="pt", device="cpu") as shard:
        old = {name: shard.get_tensor(name).to(device) for name in shard.keys()}  # noqa: SIM118
    torch.cuda.synchronize()
    old_seconds = time.perf_counter() - start

    start = time.perf_counter()
    with Reader(device) as reader:
        new = read_safetensors(args.path, reader)
    torch.cuda.synchronize()
    new_seconds = time.perf_counter() - start
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old), "the tensors differ"
    print(f"{torch.cuda.get_device_name()}: {size:.1f} GB file, page cache warm")
    print(f"  safe_open + .to(cuda) per tensor   {old_seconds:6.2f} s  {size / old_seconds:5.1f} GB/s")
    print(f"  sgdiff fast_load                   {new_seconds:6.2f} s  {size / new_seconds:5.1f} GB/s  (equal tensors)")


if __name__ == "__main__":
    main()
