"""What a HunyuanVideo request may carry beyond the shared fields, and the rules that refuse what the model
cannot make or would silently ignore."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sgdiff.errors import UserError
from sgdiff.pipeline.stages.validation import ValidationRule
from sgdiff.sampling import MAX_SEQUENCE_LENGTH, SamplingParams, checked

MAX_FRAMES = 1001  # a guard against typos; HunyuanVideo is trained on up to 129 frames
VAE_TEMPORAL_FACTOR = 4  # 4k+1 frames -> k+1 latent frames


@dataclass(frozen=True)
class HunyuanVideoSampling(SamplingParams):
    # the embedded guidance (guidance-distilled: one forward a step), diffusers' default 6
    guidance_scale: float = 6.0
    # true classifier-free guidance against `negative_prompt`, as diffusers' HunyuanVideoPipeline runs it
    # (a second forward a step): used where a negative prompt is given and the scale is > 1
    true_cfg_scale: float = checked(1.0, lambda v: v >= 1, "must be >= 1")
    max_sequence_length: int = checked(  # the Llama tokens kept after the template's system part (diffusers': 256)
        256, lambda v: 1 <= v <= MAX_SEQUENCE_LENGTH, f"must be between 1 and {MAX_SEQUENCE_LENGTH}"
    )
    num_frames: int = checked(129, lambda v: 1 <= v <= MAX_FRAMES, f"must be between 1 and {MAX_FRAMES}")
    num_frames_round_down: bool = False  # a frame count that is not 4k+1 is rounded down instead of refused
    fps: int | None = checked(None, lambda v: 1 <= v <= 240, "must be between 1 and 240")  # None: the preset's


def true_cfg_scale_of(params: HunyuanVideoSampling) -> float | None:
    """As diffusers: true CFG when a negative prompt is given and true_cfg_scale > 1."""
    return params.true_cfg_scale if params.negative_prompt is not None and params.true_cfg_scale > 1 else None


def spatial_factor(vae_config: dict[str, Any]) -> int:
    return int(vae_config.get("spatial_compression_ratio", 8))


def round_frames_down(num_frames: int) -> int:
    return (num_frames - 1) // VAE_TEMPORAL_FACTOR * VAE_TEMPORAL_FACTOR + 1


def hunyuan_video_adjust(params: Any) -> Any:
    """`num_frames_round_down`: the nearest valid frame count below the one asked for (the VAE's 4x). Both
    HunyuanVideo families' requests (their num_frames and num_frames_round_down)."""
    if params.num_frames_round_down and params.num_frames % VAE_TEMPORAL_FACTOR != 1:
        return replace(params, num_frames=round_frames_down(params.num_frames))
    return params


def frame_and_size_rules(multiple: int) -> list[ValidationRule]:
    """Frames that fill the VAE's latent frames (4k+1) and sizes that fill its latent pixels and the
    transformer's patches (`multiple`): both HunyuanVideo families'."""

    def frames_fill_latent_frames(params: Any) -> None:
        # diffusers would make (num_frames - 1) // 4 * 4 + 1 frames: not the count asked for
        if params.num_frames % VAE_TEMPORAL_FACTOR != 1:
            lower = round_frames_down(params.num_frames)
            raise UserError(
                f"`num_frames` must be 4k+1 (e.g. {lower} or {lower + VAE_TEMPORAL_FACTOR}), got {params.num_frames}; "
                "or pass `num_frames_round_down`",
                field="num_frames",
            )

    def size_fits_patches(params: Any) -> None:
        for name, value in (("height", params.height), ("width", params.width)):
            if value % multiple:
                raise UserError(f"`{name}` must be a multiple of {multiple} for this model, got {value}", field=name)

    return [frames_fill_latent_frames, size_fits_patches]


def hunyuan_video_rules(transformer_config: dict[str, Any], vae_config: dict[str, Any]) -> list[ValidationRule]:
    """From the checkpoint's configs: frames that fill the VAE's latent frames, sizes that fill its latent
    pixels and the transformer's patches (8 x 2 = 16), and true CFG's two fields given together."""
    multiple = spatial_factor(vae_config) * int(transformer_config.get("patch_size", 2))
    if int(vae_config.get("temporal_compression_ratio", VAE_TEMPORAL_FACTOR)) != VAE_TEMPORAL_FACTOR:
        raise UserError("this HunyuanVideo VAE does not compress time by 4, which sgdiff's pipeline assumes")

    def true_cfg_pairs(params: HunyuanVideoSampling) -> None:
        if params.negative_prompt is not None and params.true_cfg_scale <= 1:
            raise UserError(
                "`negative_prompt` is used only with true CFG: add `true_cfg_scale` > 1 (e.g. 4)",
                field="negative_prompt",
            )
        if params.negative_prompt is None and params.true_cfg_scale > 1:
            raise UserError(
                '`true_cfg_scale` needs a `negative_prompt` (HunyuanVideo runs true CFG against it; " " will do)',
                field="true_cfg_scale",
            )

    return [*frame_and_size_rules(multiple), true_cfg_pairs]
