"""Parallel VAE decode (parallel/vae.py): the tiles of a tiled decode shared out over 2 and 3 CPU
processes (gloo), tile counts the ranks do not divide, give one process's decode; and a Wan text-to-video
request with --vae-tiling on several processes gives one process's video."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sgdiff.config import ParallelConfig, RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.models.tiles import TileAxis, TileGrid
from sgdiff.parallel.vae import assign_tiles
from sgdiff.testing.distributed import run_on_ranks
from sgdiff.testing.tiny_configs import FLUX_VAE, WAN21_VAE
from sgdiff.testing.vae_tiles import decode_here, decode_over_ranks, tiled_pipeline_videos

MODES = {"2": ParallelConfig(2), "3": ParallelConfig(3, ring_degree=3)}
WAN_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                 tile_sample_stride_width=24)  # fmt: skip
IMAGE_TILES = dict(tile_sample_min_size=32, tile_latent_min_size=16)
CASES = [
    ("video", WAN21_VAE, (1, 4, 2, 3, 13), WAN_TILES),  # 1x5 tiles
    ("image", FLUX_VAE, (2, FLUX_VAE["latent_channels"], 50, 54), IMAGE_TILES),  # 5x5 tiles, a batch of two
]
# Wan 48x80 (tiny VAE: 8x): 6x10 latents; tiles of 48x24 pixels every 48x16 (6x3 latents every 6x2): 1x5
REQUEST = dict(height=48, width=80, num_frames=5, num_inference_steps=2, guidance_scale=3.0, negative_prompt="blurry")
PIPELINE_TILES = dict(tile_sample_min_height=48, tile_sample_min_width=24, tile_sample_stride_height=48,
                      tile_sample_stride_width=16)  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tiny_wan):
    model = str(tiny_wan("t2v"))
    untiled = ModelRunner(model, runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    return {
        "decodes": decode_here(CASES),
        "video": tiled_pipeline_videos(None, model, REQUEST, PIPELINE_TILES)[0],
        "untiled video": untiled.generate(untiled.sampling_params("a red cube", **REQUEST)).videos,
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_parallel_decode_equals_one_process(mode, tiny_wan, one_process):
    world = MODES[mode].num_gpus
    per_rank = run_on_ranks(MODES[mode], both_parts, str(tiny_wan("t2v")))
    for case, expected in enumerate(one_process["decodes"]):
        outputs = [rank_result[0][case] for rank_result in per_rank]
        output, _, tiles = outputs[0]
        assert tiles % world, "the ranks do not divide the tiles evenly"
        assert output.shape == expected.shape and (output - expected).abs().max() <= 1e-6
        assert all(out is None for out, _, _ in outputs[1:])  # rank 0 alone ends with the output
        decoded = [count for _, count, _ in outputs]
        assert sum(decoded) == tiles and min(decoded) >= 1  # each tile once, every rank some (by area: see below)
    videos, counts = zip(*(rank_result[1] for rank_result in per_rank), strict=True)
    assert all(video is None for video in videos[1:])
    expected = one_process["video"]
    assert videos[0].shape == expected.shape == (1, 5, 48, 80, 3)
    assert abs(videos[0].astype(int) - expected.astype(int)).max() <= 1  # the latents agree to ~1e-5
    assert sum(counts) == 5 and min(counts) >= 1
    assert abs(expected.astype(int) - one_process["untiled video"].astype(int)).max() > 1  # tiling ran


def both_parts(groups, model: str):
    """The decoder cases and the pipeline request, in one spawn of the ranks (a run_on_ranks function)."""
    return decode_over_ranks(groups, CASES), tiled_pipeline_videos(groups, model, REQUEST, PIPELINE_TILES)


def test_tiles_go_to_the_least_loaded_rank():
    """720p Wan: 4 x 7 tiles of up to 32x32 latents, the last row 18 and the last column 16 high/wide."""
    grid = TileGrid(TileAxis(90, 32, 24, 8, 192, 64), TileAxis(160, 32, 24, 8, 192, 64), leading=(1, 3, 81))
    areas = [(r.stop - r.start) * (c.stop - c.start) for r, c in grid.regions]
    for world in (1, 2, 3, 8, 40):
        owner = assign_tiles(grid, world)
        load = [sum(a for a, o in zip(areas, owner, strict=True) if o == rank) for rank in range(world)]
        assert sum(load) == sum(areas) == 23712 and max(load) - min(load) <= max(areas)
        assert len(set(owner)) == min(world, len(areas))
    two = assign_tiles(grid, 2)
    assert max(sum(a for a, o in zip(areas, two, strict=True) if o == r) for r in (0, 1)) <= 1.01 * 23712 / 2


def test_a_decode_too_small_for_tiles_runs_on_rank_0_alone():
    """No tiles (tiling off, or one tile): rank 0 decodes whole, the others go on at once (no collective)."""
    from sgdiff.parallel.vae import TilesOverRanks

    class NoTiles:
        def tile_grid(self, shape):
            return None

    calls: list[torch.Tensor] = []
    for rank in (1, 0):
        groups = SimpleNamespace(rank=rank, world_size=2)
        split = TilesOverRanks(NoTiles(), lambda z: calls.append(z) or z, groups)  # type: ignore[arg-type]
        assert (split(torch.ones(1)) is None) == (rank == 1)
    assert len(calls) == 1
