"""Parallel VAE decode: the tiles of a tiled decode (models/tiles.py, --vae-tiling) shared out over every
rank of the run, each rank decoding its own, rank 0 gathering them and blending them as one process
does: the output of the single-process tiled decode (each tile is decoded alone either way, by the
same kernels; the blending runs on rank 0 in the same order), bit for bit in the tests.

Tiles go to ranks largest first, each to the rank with the least latent area so far (the edge tiles
are smaller), the same on every rank; a rank may get none. One gather brings them to rank 0: each
rank's tiles flattened into one buffer, padded to the largest rank's (every rank knows every tile's
shape from the grid)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from sgdiff.models.tiles import TiledDecoder, TileGrid
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.pipeline.base import ComposedPipeline, ParallelMode

Decode = Callable[[torch.Tensor], "torch.Tensor | None"]


def assign_tiles(grid: TileGrid, world: int) -> list[int]:
    """The rank that decodes each tile (row-major): the largest tiles first, each to the rank with the
    least latent area so far (the lowest rank on a tie)."""
    areas = [(rows.stop - rows.start) * (cols.stop - cols.start) for rows, cols in grid.regions]
    load = [0] * world
    owner = [0] * len(areas)
    for index in sorted(range(len(areas)), key=lambda i: (-areas[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += areas[index]
    return owner


class TilesOverRanks:
    """A TILE_SPLIT stage's decode over the ranks: rank 0 returns the decoded output, the others None.
    Where the latents are decoded whole (tiling off, or one tile), rank 0 decodes them alone (`whole`)."""

    def __init__(self, vae: TiledDecoder, whole: Decode, groups: ParallelGroups):
        self.vae = vae
        self.whole = whole
        self.rank, self.world = groups.rank, groups.world_size

    def __call__(self, z: torch.Tensor) -> torch.Tensor | None:
        grid = self.vae.tile_grid(tuple(z.shape))
        if grid is None:
            return self.whole(z) if self.rank == 0 else None
        owner = assign_tiles(grid, self.world)
        sizes = [torch.Size(grid.decoded_shape(i)).numel() for i in range(len(owner))]
        offsets, filled = [], [0] * self.world  # each tile's place in its rank's buffer
        for size, rank in zip(sizes, owner, strict=True):
            offsets.append(filled[rank])
            filled[rank] += size
        # this rank's tiles one after the other, as each is decoded; padded to the largest rank's
        buffer = torch.zeros(max(filled), dtype=self.vae.dtype, device=z.device)
        for index, region in enumerate(grid.regions):
            if owner[index] == self.rank:
                tile = self.vae.decode_tile(z, region)
                buffer[offsets[index] : offsets[index] + sizes[index]] = tile.reshape(-1)
        received = [torch.empty_like(buffer) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(buffer, received, dst=0)
        if received is None:
            return None
        tiles = [
            received[rank][offset : offset + size].view(grid.decoded_shape(index))
            for index, (rank, offset, size) in enumerate(zip(owner, offsets, sizes, strict=True))
        ]
        return self.vae.join_tiles(grid, tiles)


def apply_vae_parallel(pipeline: ComposedPipeline, groups: ParallelGroups) -> Callable[[], None]:
    """Every stage that declares TILE_SPLIT decodes its VAE's tiles over all the ranks; returns what
    undoes it."""
    stages = [stage for stage in pipeline.stages if stage.parallel is ParallelMode.TILE_SPLIT]
    whole = [stage.decode for stage in stages]  # type: ignore[attr-defined]  # a TILE_SPLIT stage has `decode` and `vae`
    for stage, decode in zip(stages, whole, strict=True):
        stage.decode = TilesOverRanks(stage.vae, decode, groups)  # type: ignore[attr-defined]

    def undo() -> None:
        for stage, decode in zip(stages, whole, strict=True):
            stage.decode = decode  # type: ignore[attr-defined]

    return undo
