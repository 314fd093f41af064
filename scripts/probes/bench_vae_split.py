"""Wan2.1's VAE decode (sgdiff's own decoder, float32 as the pipeline runs it) of 720p x 81 frames on one
GPU, untiled and tiled (--vae-tiling: diffusers' 256x256 tiles every 192), and tiled with its tiles
shared out over torchrun's N GPUs (parallel/vae.py, as `sgdiff generate --num-gpus N --vae-tiling`):
seconds, the speed-up of N GPUs over one GPU's tiled decode (issue 30's target: >= 1.7x on 2), and the
largest difference of the N-GPU video from the one-GPU tiled video.

Random weights (the same on every rank, from one seed), random latents of the scale of Wan's. The
one-GPU decodes run on every rank at once, each on its own GPU; rank 0 reports.

    torchrun --nproc-per-node 2 scripts/probes/bench_vae_split.py [--frames 81] [--height 720]
        [--width 1280] [--repeat 2]
    torchrun --nproc-per-node 2 scripts/probes/bench_vae_split.py --tiny   (CPU, gloo: checks the script)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # sgdiff from this checkout

from sgdiff.models.video_vae import VideoVaeConfig, VideoVaeDecoder  # noqa: E402
from sgdiff.parallel.vae import TilesOverRanks, assign_tiles  # noqa: E402
from sgdiff.testing.tiny_configs import WAN21_VAE  # noqa: E402


def seconds(fn, device: torch.device, repeat: int) -> tuple[float, torch.Tensor | None]:
    """Median wall seconds of `repeat` calls (every rank starts together), and the last output."""
    times, out = [], None
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny test VAE on the CPU, with 64-pixel tiles")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)

    config = VideoVaeConfig.from_dict(WAN21_VAE) if args.tiny else VideoVaeConfig()  # Wan 2.1's architecture
    torch.manual_seed(0)
    vae = VideoVaeDecoder(config).to(device).eval()
    latent_frames = (args.frames - 1) // config.scale_factor_temporal + 1
    shape = (1, config.z_dim, latent_frames, args.height // config.scale_factor_spatial,
             args.width // config.scale_factor_spatial)  # fmt: skip
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device) * 0.5
    tiles = dict(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                 tile_sample_stride_width=48) if args.tiny else {}  # fmt: skip
    groups = SimpleNamespace(rank=rank, world_size=world)
    split = TilesOverRanks(vae, lambda z: vae.decode(z)[0], groups)  # type: ignore[arg-type]

    with torch.no_grad():
        seconds(lambda: vae.decode(latents[:, :, :2])[0], device, 1)  # warm-up: cuDNN's first calls
        untiled, _ = seconds(lambda: vae.decode(latents)[0], device, args.repeat)
        vae.enable_tiling(**tiles)
        tiled, one_gpu = seconds(lambda: vae.decode(latents)[0], device, args.repeat)
        shared, many_gpus = seconds(lambda: split(latents), device, args.repeat)

    if rank == 0:
        assert one_gpu is not None and many_gpus is not None
        grid = vae.tile_grid(shape)
        assert grid is not None
        areas = [(r.stop - r.start) * (c.stop - c.start) for r, c in grid.regions]
        owner = assign_tiles(grid, world)
        load = [sum(a for a, o in zip(areas, owner, strict=True) if o == r) for r in range(world)]
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        cover = sum(areas) / (shape[3] * shape[4])
        print(f"{name}; latents {list(shape)} -> video {list(one_gpu.shape)}; {grid.shape[0]}x{grid.shape[1]} tiles "
              f"covering {cover:.2f}x the latents; latent area per rank {load}")  # fmt: skip
        print(f"1 GPU untiled {untiled:.2f} s, 1 GPU tiled {tiled:.2f} s, {world} GPUs tiled {shared:.2f} s: "
              f"{tiled / shared:.2f}x over 1 GPU tiled, {untiled / shared:.2f}x over 1 GPU untiled")  # fmt: skip
        print(f"max |{world} GPUs - 1 GPU| (tiled): {(many_gpus - one_gpu).abs().max().item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
