"""The layers of Wan's video VAE decoder, and the cache that lets it decode one latent frame at a time.

Every convolution with a temporal extent is causal: output frame t sees input frames t-2..t. Decoding
runs chunk by chunk (one latent frame, which grows to several frames inside the up blocks); each causal
convolution keeps the last two frames of its input in a FrameCache, and the next chunk sees them where
the first chunk saw zero padding. Parameter names are diffusers' (AutoencoderKLWan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CACHED_FRAMES = 2  # what a kernel of 3 frames needs from before the chunk


class FrameCache:
    """What decoding carries from one chunk to the next: per causal convolution, the last frames of its
    input; `first` while the first chunk (latent frame 0) runs."""

    def __init__(self) -> None:
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.first = True


class CausalConv3d(nn.Conv3d):
    """A Conv3d zero-padded symmetrically in space and only in front in time; with a FrameCache, the
    previous chunk's last input frames stand in for (some of) the zero frames."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int, int]):
        super().__init__(in_channels, out_channels, kernel)  # no padding of its own: forward pads
        frames, rows, cols = self.kernel_size
        self.front = frames - 1
        self.space = (cols // 2, cols // 2, rows // 2, rows // 2)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        # x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        front = self.front
        if cache is not None and front:
            earlier = cache.inputs.get(self)
            if earlier is not None:
                x = torch.cat([earlier, x], dim=2)  # [B, C_in, T_earlier + T, H, W]
                front -= earlier.shape[2]
            cache.inputs[self] = x[:, :, -CACHED_FRAMES:].clone()
        return super().forward(F.pad(x, (*self.space, front, 0)))


class RmsNorm(nn.Module):
    """x / |x| over the channels (dim 1), times sqrt(C) and a per-channel gain `gamma` (no bias)."""

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))  # [C, 1, 1(, 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_precision = x.dtype in (torch.float16, torch.bfloat16)  # normalised in float32 there
        normalized = F.normalize(x.float() if low_precision else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """x -> conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x), both convs causal 3x3x3; a 1x1x1
    `conv_shortcut` where the width changes. (Dropout, off at inference, is left out.)"""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = RmsNorm(in_channels, spatial_dims=3)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = RmsNorm(out_channels, spatial_dims=3)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:  # [B, C_in, T, H, W] -> [B, C_out, ...]
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return h + skip


def frames_as_images(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B, C, T, H, W] -> [B*T, C, H, W]


def images_as_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.view(batch, bt // batch, c, h, w).permute(0, 2, 1, 3, 4)  # [B*T, C, H, W] -> [B, C, T, H, W]


class FrameAttention(nn.Module):
    """Self-attention within each frame over its H*W positions, one head as wide as the channels, on
    RMS-normed input, added back to the input. SDPA directly (not models/attention.py): decoding runs
    whole on one rank, so the entry point that sequence parallelism swaps must not reach it."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RmsNorm(channels, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] -> same
        b, c, _, h, w = x.shape
        images = self.norm(frames_as_images(x))  # [B*T, C, H, W]
        qkv = self.to_qkv(images).reshape(images.shape[0], 1, 3 * c, h * w)  # [B*T, 1, 3C, H*W]
        q, k, v = qkv.permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)  # each [B*T, 1, H*W, C]
        out = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        out = out.squeeze(1).permute(0, 2, 1).reshape(-1, c, h, w)  # [B*T, C, H, W]
        return images_as_frames(self.proj(out), b) + x


class MidBlock(nn.Module):
    """Residual block, frame attention, residual block, at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([FrameAttention(channels)])

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class NearestUpsample2x(nn.Module):
    """2x nearest-exact upsampling of images, computed in float32 (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C, 2H, 2W]
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Upsample(nn.Module):
    """2x in space (nearest, then a 3x3 conv to `out_channels`), and with `frames` also 2x in time: a
    causal conv makes two frames' worth of channels from each frame, interleaved into twice the frames.
    The first chunk (latent frame 0) is not doubled in time: 4k+1 frames come from k+1 latent frames."""

    def __init__(self, channels: int, out_channels: int, frames: bool):
        super().__init__()
        self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if frames else None

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:  # [B, C, T, H, W] -> [B, C', 2T?, 2H, 2W]
        if self.time_conv is not None and not cache.first:
            b, c, t, h, w = x.shape
            pairs = self.time_conv(x, cache).view(b, 2, c, t, h, w)  # [B, 2C, T, H, W] -> [B, 2, C, T, H, W]
            x = pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame 2t+i: pair i of frame t
        return images_as_frames(self.resample(frames_as_images(x)), x.shape[0])


def duplicate_up(x: torch.Tensor, out_channels: int, frames: int, first: bool) -> torch.Tensor:
    """Wan 2.2's parameter-free shortcut around an up block: each input channel repeated, the copies laid
    out as `frames` x 2 x 2 new frames and pixels. The first chunk keeps only its last new frame.
    [B, C, T, H, W] -> [B, out_channels, T*frames (or 1 in the first chunk), 2H, 2W]"""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_channels * frames * 4 // c, dim=1)  # [B, out * frames * 4, T, H, W]
    x = x.view(b, out_channels, frames, 2, 2, t, h, w)  # channel -> (out, new frame, row, column)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, out_channels, t * frames, 2 * h, 2 * w)
    return x[:, :, frames - 1 :] if first else x
