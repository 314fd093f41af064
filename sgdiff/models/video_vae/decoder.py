"""The decoding half of Wan's video VAE (diffusers' AutoencoderKLWan, Wan 2.1 and Wan 2.2):
latents [B, z_dim, F, h, w] -> video [B, 3, 4(F-1)+1, h*s, w*s] in [-1, 1].

Math only. Parameter names match diffusers' (`post_quant_conv.*`, `decoder.*`), so its checkpoint loads
strictly once the encoder's tensors (`encoder.*`, `quant_conv.*`) are dropped.

    post_quant_conv (1x1x1) -> per latent frame, with a FrameCache: conv_in -> mid block (resnet,
      frame attention, resnet) -> up blocks (resnets, then 2x up in space, some also 2x in time)
      -> RMS norm, SiLU, conv_out -> frames joined -> (Wan 2.2) 2x2 patches to pixels -> clamp

With tiling (models/tiles.py) each spatial tile of the latents runs that whole path up to the joined
frames on its own; the tiles are blended, then patches to pixels and clamp run once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgdiff.models.tiles import TileAxis, TileGrid, blend_tiles, one_at_a_time
from sgdiff.models.video_vae.config import VideoVaeConfig
from sgdiff.models.video_vae.layers import (
    CausalConv3d,
    FrameCache,
    MidBlock,
    ResidualBlock,
    RmsNorm,
    Upsample,
    duplicate_up,
)


class UpBlock(nn.Module):
    """Wan 2.1: `layers` residual blocks (the first changes the width), then an optional upsampler that
    halves the width."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, frames: bool | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList(ResidualBlock(widths[i], out_channels) for i in range(layers))
        upsample = [] if frames is None else [Upsample(out_channels, out_channels // 2, frames)]
        self.upsamplers = nn.ModuleList(upsample)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        for upsampler in self.upsamplers:
            x = upsampler(x, cache)
        return x


class ResidualUpBlock(nn.Module):
    """Wan 2.2: like UpBlock, but the upsampler keeps the width, and the block's input, duplicated into
    the new frames and pixels (`duplicate_up`), is added to its output."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, frames: bool | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList(ResidualBlock(widths[i], out_channels) for i in range(layers))
        self.upsampler = None if frames is None else Upsample(out_channels, out_channels, frames)
        self.new_frames = 2 if frames else 1
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        block_input = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is None:
            return x
        x = self.upsampler(x, cache)
        return x + duplicate_up(block_input, self.out_channels, self.new_frames, cache.first)


class Decoder(nn.Module):
    """diffusers' WanDecoder3d: the widest block first, narrowing towards the pixels. One call decodes
    one chunk (a latent frame) and updates `cache` for the next."""

    def __init__(self, config: VideoVaeConfig):
        super().__init__()
        widths = config.widths  # e.g. Wan 2.1: 384, 384, 384, 192, 96
        ups = config.temporal_upsample + [None]  # per up block: 2x in time, 2x in space only, or none (last)
        self.conv_in = CausalConv3d(config.z_dim, widths[0], 3)
        self.mid_block = MidBlock(widths[0])
        blocks: list[nn.Module] = []
        for i, frames in enumerate(ups):
            if config.is_residual:
                blocks.append(ResidualUpBlock(widths[i], widths[i + 1], config.num_res_blocks + 1, frames))
            else:  # every upsampler but the last halves the width it hands on
                in_channels = widths[i] // 2 if i > 0 else widths[i]
                blocks.append(UpBlock(in_channels, widths[i + 1], config.num_res_blocks + 1, frames))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RmsNorm(widths[-1], spatial_dims=3)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, 3)

    def forward(self, z: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        # z: [B, z_dim, 1, h, w] -> [B, out_channels, 1 (first chunk) or 4, h*8, w*8]
        x = self.mid_block(self.conv_in(z, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


def unpatchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Wan 2.2: channel (c, column offset, row offset) -> pixel (row*patch + row offset, column*patch +
    column offset) of channel c. [B, C*patch^2, T, H, W] -> [B, C, T, H*patch, W*patch]"""
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (patch * patch), patch, patch, t, h, w)  # [B, C, col offset, row offset, T, H, W]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, -1, t, h * patch, w * patch)


class VideoVaeDecoder(nn.Module):
    """AutoencoderKLWan's decode path: latents already denormalised (times latents_std, plus latents_mean)
    -> video in [-1, 1]. Whole and the whole batch at once unless `enable_tiling` / `enable_slicing` (as
    diffusers' methods of those names, with its attributes and defaults: tiles of 256x256 pixels every
    192, blended over the 64 they overlap, where the video is larger than one tile)."""

    def __init__(self, config: VideoVaeConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        self.use_tiling = False
        self.use_slicing = False
        self.tile_sample_min_height = 256  # pixels: frames larger than this are decoded in tiles
        self.tile_sample_min_width = 256
        self.tile_sample_stride_height = 192  # pixels between the starts of two tiles
        self.tile_sample_stride_width = 192

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_sample_stride_height: int | None = None,
        tile_sample_stride_width: int | None = None,
    ) -> None:
        """Decode in tiles (diffusers' AutoencoderKLWan.enable_tiling: a size left out keeps its value)."""
        self.use_tiling = True
        self.tile_sample_min_height = tile_sample_min_height or self.tile_sample_min_height
        self.tile_sample_min_width = tile_sample_min_width or self.tile_sample_min_width
        self.tile_sample_stride_height = tile_sample_stride_height or self.tile_sample_stride_height
        self.tile_sample_stride_width = tile_sample_stride_width or self.tile_sample_stride_width

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Decode a batch one video at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """[B, z_dim, F, h, w] -> (video [B, 3, 4(F-1)+1, h*s, w*s],): a 1-tuple, as diffusers'
        decode(z, return_dict=False)."""
        if return_dict:
            raise ValueError("VideoVaeDecoder.decode returns a tuple only: pass return_dict=False")
        grid = self.tile_grid(tuple(z.shape))
        if grid is None:
            return (self.finish(one_at_a_time(self.decode_frames, z, self.use_slicing)),)
        return (self.join_tiles(grid, [self.decode_tile(z, region) for region in grid.regions]),)

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z_dim, F, h, w] -> the decoder's output [B, out_channels, T, h*s/p, w*s/p] (before
        unpatchify and clamp), one latent frame at a time."""
        x = self.post_quant_conv(z)  # [B, z_dim, F, h, w]
        cache = FrameCache()
        chunks = []
        for i in range(x.shape[2]):  # one latent frame at a time: memory stays that of one chunk
            chunks.append(self.decoder(x[:, :, i : i + 1], cache))
            cache.first = False
        return torch.cat(chunks, dim=2)  # [B, out_channels, T, H, W]

    def finish(self, video: torch.Tensor) -> torch.Tensor:
        """The decoder's output -> pixels: (Wan 2.2) 2x2 patches to pixels, then clamped to [-1, 1]."""
        if self.config.patch_size is not None:
            video = unpatchify(video, self.config.patch_size)
        return video.clamp(-1.0, 1.0) if self.config.clip_output else video

    def tile_grid(self, latent_shape: tuple[int, ...]) -> TileGrid | None:
        """diffusers' AutoencoderKLWan.tiled_decode's tiles, in the decoder's output (patches, for Wan 2.2);
        None: decoded whole (tiling off, or the frames no larger than one tile)."""
        batch, _, frames, height, width = latent_shape
        spatial, patch = self.config.scale_factor_spatial, self.config.patch_size or 1
        if not self.use_tiling or (
            height <= self.tile_sample_min_height // spatial and width <= self.tile_sample_min_width // spatial
        ):
            return None

        def axis(latents: int, tile: int, stride: int) -> TileAxis:  # tile, stride: in pixels
            return TileAxis(latents, tile // spatial, stride // spatial, spatial // patch, stride // patch,
                            blend=tile // patch - stride // patch)  # fmt: skip

        decoded_frames = self.config.scale_factor_temporal * (frames - 1) + 1
        return TileGrid(
            axis(height, self.tile_sample_min_height, self.tile_sample_stride_height),
            axis(width, self.tile_sample_min_width, self.tile_sample_stride_width),
            leading=(batch, self.config.out_channels, decoded_frames),
        )

    def decode_tile(self, z: torch.Tensor, region: tuple[slice, slice]) -> torch.Tensor:
        rows, cols = region  # each tile starts with an empty frame cache, as diffusers' clear_cache
        return one_at_a_time(self.decode_frames, z[:, :, :, rows, cols], self.use_slicing)

    def join_tiles(self, grid: TileGrid, tiles: list[torch.Tensor]) -> torch.Tensor:
        return self.finish(blend_tiles(grid, tiles))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)[0]
