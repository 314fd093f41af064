"""The decoding half of an image VAE in diffusers' AutoencoderKL layout (FLUX.1's, the demo's):
latents [B, C_lat, h, w] -> pixels [B, C_out, H, W] in about [-1, 1].

Math only. Parameter names match diffusers' AutoencoderKL (`decoder.*`, `post_quant_conv`), so its
checkpoint loads with `load_state_dict(assign=True)`; the encoder and `quant_conv` are not built (the
loader drops their checkpoint tensors).

    post_quant_conv (1x1, optional) -> conv_in -> mid block (resnet, attention, resnet)
      -> up blocks (resnets, then 2x nearest upsampling + conv except the last) -> GroupNorm, SiLU, conv_out
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgdiff.errors import UserError
from sgdiff.models.loading import config_fields
from sgdiff.models.tiles import TileAxis, TileGrid, blend_tiles, one_at_a_time

EPS = 1e-6  # every GroupNorm of AutoencoderKL's decoder
ACTIVATIONS = ("silu", "swish")  # diffusers' names for the same function
UP_BLOCK = "UpDecoderBlock2D"


@dataclass(frozen=True)
class ImageVaeConfig:
    """The fields of an AutoencoderKL `vae/config.json` that decoding uses (defaults: diffusers')."""

    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215  # latents are divided by it, then shifted, before decoding
    shift_factor: float | None = None
    sample_size: int | tuple[int, ...] = 32  # pixels: the tile size of a tiled decode (the first, if several)
    # where it was read, for error messages (not a config.json key)
    source: str = field(default="the VAE config", compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self.source
        if self.act_fn not in ACTIVATIONS:
            raise UserError(
                f"{where}: act_fn '{self.act_fn}' is not supported (sgdiff's image VAE decodes 'silu' only)"
            )
        unsupported = [kind for kind in self.up_block_types if kind != UP_BLOCK]
        if unsupported:
            raise UserError(
                f"{where}: up_block_types holds '{unsupported[0]}'; sgdiff's image VAE decodes '{UP_BLOCK}' only"
            )
        if len(self.up_block_types) != len(self.block_out_channels):
            raise UserError(
                f"{where}: up_block_types has {len(self.up_block_types)} entries, "
                f"block_out_channels {len(self.block_out_channels)}: they must match"
            )
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise UserError(
                f"{where}: block_out_channels {uneven[0]} is not a multiple of norm_num_groups {self.norm_num_groups}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "the VAE config") -> ImageVaeConfig:
        known = config_fields(cls, raw)
        return cls(**known, source=source)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (every up block but the last doubles the size)."""
        return 2 ** (len(self.block_out_channels) - 1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: x + conv(silu(norm(conv(silu(norm(x))))));
    a 1x1 `conv_shortcut` maps x to the new width where the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class MidBlockAttention(nn.Module):
    """Self-attention over every position of the feature map, one head as wide as the channels, on
    group-normed input, added back to the input (diffusers' Attention as UNetMidBlock2D builds it).

    It calls SDPA directly, not models/attention.py: decoding runs whole on one rank, so the entry
    point that sequence parallelism swaps must not reach it."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.1 is a dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        # one head: [B, H*W, C] -> [B, 1, H*W, C]; SDPA scales by 1/sqrt(C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, H*W, C]
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)  # [B, H*W, C] -> [B, C, H, W] channels-last
        # `out` first: the sum takes its channels-last layout, as diffusers' does, so the convolutions after
        # it run channels-last too and round as the reference's
        return out + x


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D: resnet, attention (unless turned off), resnet, at constant width."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([MidBlockAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, then a 3x3 conv (diffusers' Upsample2D with use_conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: `layers` resnets (the first changes the width), then an optional
    upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList([ResnetBlock(widths[i], out_channels, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H or 2H, W or 2W]
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class Decoder(nn.Module):
    """diffusers' vae.Decoder with group norms: the widest block first, narrowing towards the pixels."""

    def __init__(self, config: ImageVaeConfig):
        super().__init__()
        widths = list(reversed(config.block_out_channels))  # e.g. FLUX.1: 512, 512, 256, 128
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups, upsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, C_lat, h, w] -> [B, C_out, h*f, w*f]
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class ImageVaeDecoder(nn.Module):
    """AutoencoderKL's decode path: latents (already divided by `scaling_factor` and shifted by
    `shift_factor`) -> pixels in about [-1, 1]. Whole and the whole batch at once unless `enable_tiling`
    / `enable_slicing` (as diffusers' methods of those names, with its attributes and defaults: tiles of
    `sample_size` pixels overlapping by a quarter, where the image is larger than one tile)."""

    def __init__(self, config: ImageVaeConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        channels = config.latent_channels
        self.post_quant_conv = nn.Conv2d(channels, channels, 1) if config.use_post_quant_conv else None
        self.use_tiling = False
        self.use_slicing = False
        size = config.sample_size[0] if isinstance(config.sample_size, tuple) else config.sample_size
        self.tile_sample_min_size = size  # pixels: images larger than this are decoded in tiles
        self.tile_latent_min_size = int(size / config.scale_factor)
        self.tile_overlap_factor = 0.25

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def enable_tiling(self) -> None:
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Decode a batch one image at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, latent_channels, h, w] -> [B, out_channels, h * scale_factor, w * scale_factor]."""
        grid = self.tile_grid(tuple(latents.shape))
        if grid is None:
            return one_at_a_time(self.decode_whole, latents, self.use_slicing)
        return self.join_tiles(grid, [self.decode_tile(latents, region) for region in grid.regions])

    def decode_whole(self, latents: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def tile_grid(self, latent_shape: tuple[int, ...]) -> TileGrid | None:
        """diffusers' AutoencoderKL.tiled_decode's tiles; None: decoded whole (tiling off, or the image
        no larger than one tile)."""
        batch, _, height, width = latent_shape
        tile = self.tile_latent_min_size
        if not self.use_tiling or (height <= tile and width <= tile):
            return None
        blend = int(self.tile_sample_min_size * self.tile_overlap_factor)
        stride = int(tile * (1 - self.tile_overlap_factor))
        keep = self.tile_sample_min_size - blend
        scale = self.config.scale_factor
        return TileGrid(
            TileAxis(height, tile, stride, scale, keep, blend),
            TileAxis(width, tile, stride, scale, keep, blend),
            leading=(batch, self.config.out_channels),
        )

    def decode_tile(self, latents: torch.Tensor, region: tuple[slice, slice]) -> torch.Tensor:
        rows, cols = region
        return one_at_a_time(self.decode_whole, latents[:, :, rows, cols], self.use_slicing)

    def join_tiles(self, grid: TileGrid, tiles: list[torch.Tensor]) -> torch.Tensor:
        return blend_tiles(grid, tiles)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)
