"""The decoding half of Wan's video VAE (diffusers' AutoencoderKLWan, Wan 2.1 and Wan 2.2):
latents [B, z_dim, F, h, w] -> video [B, 3, 4(F-1)+1, h*s, w*s] in [-1, 1].

Math only. Parameter names match diffusers' (`post_quant_conv.*`, `decoder.*`), so its checkpoint loads
strictly once the encoder's tensors (`encoder.*`, `quant_conv.*`) are dropped.

    post_quant_conv (1x1x1) -> per latent frame, with a FrameCache: conv_in -> mid block (resnet,
      frame attention, resnet) -> up blocks (resnets, then 2x up in space, some also 2x in time)
      -> RMS norm, SiLU, conv_out -> frames joined -> (Wan 2.2) 2x2 patches to pixels -> clamp
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    """AutoencoderKLWan's decode path (untiled, the whole batch at once): latents already denormalised
    (times latents_std, plus latents_mean) -> video in [-1, 1]."""

    def __init__(self, config: VideoVaeConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """[B, z_dim, F, h, w] -> (video [B, 3, 4(F-1)+1, h*s, w*s],): a 1-tuple, as diffusers'
        decode(z, return_dict=False)."""
        if return_dict:
            raise ValueError("VideoVaeDecoder.decode returns a tuple only: pass return_dict=False")
        x = self.post_quant_conv(z)  # [B, z_dim, F, h, w]
        cache = FrameCache()
        chunks = []
        for i in range(x.shape[2]):  # one latent frame at a time: memory stays that of one chunk
            chunks.append(self.decoder(x[:, :, i : i + 1], cache))
            cache.first = False
        video = torch.cat(chunks, dim=2)  # [B, out_channels, T, H, W]
        if self.config.patch_size is not None:
            video = unpatchify(video, self.config.patch_size)
        return (video.clamp(-1.0, 1.0) if self.config.clip_output else video,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)[0]
