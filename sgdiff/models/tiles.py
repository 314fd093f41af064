"""Tiled VAE decoding as diffusers does it (AutoencoderKL.tiled_decode, AutoencoderKLWan.tiled_decode):
the latents are cut into overlapping tiles, each tile is decoded on its own, and each decoded tile is
blended into the tile above it and the tile to its left (a linear ramp over the overlap), then cropped
to its stride and the tiles joined. Math only: which process decodes which tile is parallel/vae.py's.

    latents [.., h, w]  ->  tile (r, c): latents [.., r*stride : r*stride + tile, c*stride : c*stride + tile]
      -> decoded [.., th*scale, tw*scale]  ->  blended (in row-major order, in place, as diffusers)
      -> the first `keep` values of each side kept  ->  joined [.., h*scale, w*scale]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class TileAxis:
    """How one side of the latents (rows or columns) is cut into tiles, and how much of each decoded
    tile is blended and kept. Latent tiles start every `stride` latents, are `tile` long (fewer at the
    end); `scale` decoded values per latent (the decoder's output, before any unpatchify)."""

    latents: int
    tile: int
    stride: int
    scale: int
    keep: int  # decoded values of each tile kept (the rest overlaps the next tile)
    blend: int  # decoded values at the start of a tile ramped from the previous tile's last ones

    @property
    def starts(self) -> range:
        return range(0, self.latents, self.stride)

    def extent(self, start: int) -> int:
        """Latents of the tile starting at `start`."""
        return min(self.tile, self.latents - start)

    @property
    def decoded(self) -> int:
        return self.latents * self.scale


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one decode, in diffusers' (row-major) order; `leading`: the dimensions of a decoded
    tile before its two spatial ones (batch, channels and, for a video, frames)."""

    rows: TileAxis
    cols: TileAxis
    leading: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows.starts), len(self.cols.starts)

    @property
    def regions(self) -> list[tuple[slice, slice]]:
        """Each tile's latent rows and columns, row-major."""
        rows, cols = self.rows, self.cols
        return [(slice(r, r + rows.extent(r)), slice(c, c + cols.extent(c))) for r in rows.starts for c in cols.starts]

    def decoded_shape(self, index: int) -> tuple[int, ...]:
        """The shape of tile `index` decoded."""
        rows, cols = self.regions[index]
        return (*self.leading, (rows.stop - rows.start) * self.rows.scale, (cols.stop - cols.start) * self.cols.scale)


@runtime_checkable
class TiledDecoder(Protocol):
    """A VAE decoder whose tiled decode comes in parts that can run apart (on several processes:
    parallel/vae.py); decode(z) is join_tiles(grid, [decode_tile(z, region) for each region])."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its weights, and of the tiles it decodes."""
        ...

    def tile_grid(self, latent_shape: tuple[int, ...]) -> TileGrid | None:
        """The tiles to decode latents of this shape in; None: decoded whole (tiling off, or one tile)."""
        ...

    def decode_tile(self, z: torch.Tensor, region: tuple[slice, slice]) -> torch.Tensor:
        """The latents' `region` (rows, columns) decoded: the tile's shape in TileGrid.decoded_shape."""
        ...

    def join_tiles(self, grid: TileGrid, tiles: list[torch.Tensor]) -> torch.Tensor:
        """The decoded tiles (row-major; blended in place) -> the decoder's output for the whole latents."""
        ...


def blend_edge(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """diffusers' blend_v (dim -2) / blend_h (dim -1), at once instead of one row at a time: the first
    `extent` values of `tile` along `dim` become a ramp from `before`'s last ones (weight 1 - y/extent)
    to the tile's own (weight y/extent), rounded as diffusers rounds them (each product, then the sum, in
    `tile`'s dtype). In place."""
    extent = min(before.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return
    shape = [1] * tile.dim()
    shape[dim] = extent
    weight_in = torch.tensor([y / extent for y in range(extent)], dtype=torch.float32, device=tile.device)
    weight_out = torch.tensor([1 - y / extent for y in range(extent)], dtype=torch.float32, device=tile.device)
    head = tile.narrow(dim, 0, extent)
    tail = before.narrow(dim, before.shape[dim] - extent, extent)
    head.copy_((tail * weight_out.view(shape)).to(tile.dtype) + (head * weight_in.view(shape)).to(tile.dtype))


def blend_tiles(grid: TileGrid, tiles: list[torch.Tensor]) -> torch.Tensor:
    """Decoded tiles (row-major, each [..., th, tw]) -> one output [..., rows.decoded, cols.decoded]:
    each tile, in order, blended into the (already blended) tile above and the one to its left, then
    cut to `keep` values a side. The tiles are changed in place."""
    n_rows, n_cols = grid.shape
    rows = [tiles[r * n_cols : (r + 1) * n_cols] for r in range(n_rows)]
    joined = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                blend_edge(rows[i - 1][j], tile, grid.rows.blend, dim=-2)
            if j > 0:
                blend_edge(row[j - 1], tile, grid.cols.blend, dim=-1)
            kept.append(tile[..., : grid.rows.keep, : grid.cols.keep])
        joined.append(torch.cat(kept, dim=-1))
    return torch.cat(joined, dim=-2)[..., : grid.rows.decoded, : grid.cols.decoded]


def one_at_a_time(decode, z: torch.Tensor, slicing: bool) -> torch.Tensor:
    """decode(z), or with `slicing` (and a batch of several) decode(z[i:i+1]) for each batch item, joined:
    diffusers' enable_slicing (less memory, the same output)."""
    if not slicing or z.shape[0] == 1:
        return decode(z)
    return torch.cat([decode(item) for item in z.split(1)])
