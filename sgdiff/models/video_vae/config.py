"""The fields of a diffusers AutoencoderKLWan `vae/config.json` (Wan 2.1 and Wan 2.2), with diffusers'
defaults, and the configs sgdiff's decoder refuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sgdiff.errors import UserError
from sgdiff.models.loading import config_fields

RGB = 3  # channels of the decoded video (after unpatchify)

# diffusers' defaults: Wan 2.1's per-channel latent statistics
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VideoVaeConfig:
    """AutoencoderKLWan's constructor arguments (diffusers 0.42.1), read from its config.json.

    Decoding uses the decoder's widths (`decoder_base_dim`, else `base_dim`, times `dim_mult` reversed),
    `num_res_blocks`, `temperal_downsample` (diffusers' spelling; reversed it says which up blocks double
    the frames), `is_residual` (Wan 2.2's up blocks with a duplicating shortcut), `out_channels` and
    `patch_size` (Wan 2.2: the decoder's 12 channels are 2x2 patches of RGB). The encoder's fields
    (`base_dim` where the decoder has its own, `in_channels`, `attn_scales`) and `dropout` change nothing."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int = 4  # null in a config: taken from the architecture
    scale_factor_spatial: int = 8
    clip_output: bool = True  # (not a diffusers 0.42.1 key: it always clamps the video to [-1, 1])
    # where it was read, for error messages (not a config.json key)
    source: str = field(default="the VAE config", compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, value in (("scale_factor_temporal", self.temporal_factor), ("scale_factor_spatial", self.spatial)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        where = self.source
        for problem in (self.shape_problem(), self.statistics_problem(), self.scale_problem()):
            if problem:
                raise UserError(f"{where}: {problem}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "the VAE config") -> VideoVaeConfig:
        known = config_fields(cls, raw)
        return cls(**known, source=source)

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def widths(self) -> list[int]:
        """The decoder's widths: conv_in and the mid block, then each up block's output."""
        return [self.decoder_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]

    @property
    def temporal_upsample(self) -> list[bool]:
        """Per up block (all but the last): whether it doubles the frames."""
        return list(reversed(self.temperal_downsample))

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(map(bool, self.temperal_downsample))

    @property
    def spatial(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    def shape_problem(self) -> str | None:
        ups = len(self.dim_mult) - 1
        if ups < 0:
            return "dim_mult is empty"
        if len(self.temperal_downsample) != ups:
            return f"temperal_downsample has {len(self.temperal_downsample)} entries; dim_mult needs {ups}"
        patch = self.patch_size or 1
        if patch < 1 or self.out_channels != RGB * patch * patch:
            return (
                f"out_channels {self.out_channels} with patch_size {self.patch_size} does not decode to RGB "
                f"(sgdiff's video VAE needs out_channels = 3 x patch_size^2)"
            )
        if self.is_residual:
            return self.shortcut_problem()
        return None

    def shortcut_problem(self) -> str | None:
        """Wan 2.2's duplicating shortcut spreads an up block's input channels over its output's (and the
        new frames and pixels): it needs a whole number of copies."""
        widths = self.widths
        for i, doubles_frames in enumerate(self.temporal_upsample):
            grown = widths[i + 1] * (2 if doubles_frames else 1) * 4
            if grown % widths[i]:
                return f"up block {i} widens {widths[i]} -> {widths[i + 1]} channels, which its shortcut cannot"
        return None

    def statistics_problem(self) -> str | None:
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                return f"{name} has {len(getattr(self, name))} entries, z_dim is {self.z_dim}: they must match"
        return None

    def scale_problem(self) -> str | None:
        if self.scale_factor_temporal != self.temporal_factor:
            return (
                f"scale_factor_temporal {self.scale_factor_temporal} does not match temperal_downsample "
                f"(which compresses time by {self.temporal_factor})"
            )
        if self.scale_factor_spatial != self.spatial:
            return (
                f"scale_factor_spatial {self.scale_factor_spatial} does not match dim_mult and patch_size "
                f"(which compress each side by {self.spatial})"
            )
        return None
