"""What a Wan request may carry beyond the shared fields, and the rules that refuse what a Wan
checkpoint cannot do or would silently ignore."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

from sgdiff.errors import UserError
from sgdiff.io.input_image import check_image_path
from sgdiff.pipeline.stages.validation import ValidationRule
from sgdiff.sampling import SamplingParams, checked

VAE_TEMPORAL_FACTOR = 4  # both Wan VAEs: 4k+1 frames -> k+1 latent frames
MAX_FRAMES = 1001  # ~1 minute at 16 fps; Wan is trained on 81 (121 for TI2V)


def _decreasing_timesteps(steps: tuple[int, ...]) -> bool:
    decreasing = all(a > b for a, b in zip(steps, steps[1:], strict=False))
    return len(steps) >= 1 and all(0 < t <= 1000 for t in steps) and decreasing


@dataclass(frozen=True)
class WanSampling(SamplingParams):
    # None: the model's preset decides
    num_frames: int | None = checked(None, lambda v: 1 <= v <= MAX_FRAMES, f"must be between 1 and {MAX_FRAMES}")
    num_frames_round_down: bool = False  # a frame count that is not 4k+1 is rounded down instead of refused
    fps: int | None = checked(None, lambda v: 1 <= v <= 240, "must be between 1 and 240")
    guidance_scale_2: float | None = checked(None, lambda v: v >= 0, "must be >= 0")  # Wan2.2 MoE: low-noise expert
    flow_shift: float | None = checked(None, lambda v: v > 0, "must be > 0")
    image_path: str | None = None  # image-to-video: a local file or an http(s) URL
    # "default": the checkpoint's scheduler; "dmd": few-step DMD sampling at `dmd_timesteps` (FastWan)
    sampler: str = checked("default", lambda v: v in ("default", "dmd"), "must be 'default' or 'dmd'")
    dmd_timesteps: tuple[int, ...] | None = checked(None, _decreasing_timesteps, "must be decreasing, within 1..1000")


def round_frames_down(num_frames: int) -> int:
    return (num_frames - 1) // VAE_TEMPORAL_FACTOR * VAE_TEMPORAL_FACTOR + 1


def wan_adjust(params: WanSampling) -> WanSampling:
    """`num_frames_round_down`: the nearest valid frame count below the one asked for."""
    if params.num_frames_round_down and params.num_frames is not None and params.num_frames % VAE_TEMPORAL_FACTOR != 1:
        return replace(params, num_frames=round_frames_down(params.num_frames))
    return params


def wan_rules(
    transformer_config: dict[str, Any],
    model_index: dict[str, Any],
    vae_config: dict[str, Any],
    experts: tuple[bool, bool] = (True, False),
) -> list[ValidationRule]:
    """`experts`: whether transformer/ and transformer_2/ exist in the checkpoint."""
    patch = transformer_config.get("patch_size", (1, 2, 2))
    spatial = int(vae_config.get("scale_factor_spatial", 8))
    multiples = {"height": spatial * int(patch[1]), "width": spatial * int(patch[2])}
    if int(vae_config.get("scale_factor_temporal", VAE_TEMPORAL_FACTOR)) != VAE_TEMPORAL_FACTOR:
        raise UserError("this Wan VAE does not compress time by 4, which sgdiff's Wan pipeline assumes")

    def frames_are_4k_plus_1(params: WanSampling) -> None:
        if params.num_frames is None:
            raise UserError("this video model needs `num_frames` (its preset sets none)", field="num_frames")
        if params.num_frames % VAE_TEMPORAL_FACTOR != 1:
            lower = round_frames_down(params.num_frames)
            raise UserError(
                f"`num_frames` must be 4k+1 (e.g. {lower} or {lower + 4}), got {params.num_frames}; "
                "or pass `num_frames_round_down`",
                field="num_frames",
            )

    def size_fits_patches(params: WanSampling) -> None:
        for name, value in (("height", params.height), ("width", params.width)):
            if value % multiples[name]:
                raise UserError(
                    f"`{name}` must be a multiple of {multiples[name]} for this model, got {value}", field=name
                )

    def second_guidance_needs_two_experts(params: WanSampling) -> None:
        if params.guidance_scale_2 is not None and model_index.get("boundary_ratio") is None:
            raise UserError(
                "`guidance_scale_2` (given or from a preset) is for Wan2.2 A14B; this model has one expert",
                field="guidance_scale_2",
            )

    image_to_video = model_index.get("_class_name") == "WanImageToVideoPipeline"
    takes_image = image_to_video or bool(model_index.get("expand_timesteps"))  # TI2V does both

    def image_fits_the_model(params: WanSampling) -> None:
        if image_to_video and params.image_path is None:
            raise UserError(
                "this image-to-video model needs `image_path` (a file or an http(s) URL)", field="image_path"
            )
        if params.image_path is not None:
            if not takes_image:
                raise UserError(
                    "`image_path`: this model makes video from text only; use an I2V or TI2V checkpoint",
                    field="image_path",
                )
            check_image_path(params.image_path)

    two_experts = model_index.get("boundary_ratio") is not None
    image_cross_attention = transformer_config.get("image_dim") is not None

    def experts_are_there(params: WanSampling) -> None:
        if two_experts and not all(experts):
            raise UserError("this Wan2.2 checkpoint sets boundary_ratio but lacks transformer/ or transformer_2/")
        if not two_experts and not experts[0]:
            raise UserError("this Wan checkpoint has no transformer/ folder")

    def text_length_fits_image_attention(params: WanSampling) -> None:
        # the reference splits the context at 512 text tokens: another length would not be the same model
        if image_cross_attention and params.max_sequence_length != 512:
            raise UserError(
                "`max_sequence_length` must stay 512 for Wan2.1 I2V (its image attention expects it)",
                field="max_sequence_length",
            )

    def dmd_is_complete(params: WanSampling) -> None:
        if params.sampler != "dmd":
            return
        if two_experts or model_index.get("expand_timesteps") or image_to_video:
            raise UserError("DMD sampling (FastWan) is for single-expert Wan2.1 T2V checkpoints only", field="sampler")
        if params.dmd_timesteps is None:
            raise UserError("DMD sampling needs `dmd_timesteps` in the preset (e.g. [1000, 757, 522])", field="sampler")
        if params.num_inference_steps != len(params.dmd_timesteps):
            steps = ", ".join(map(str, params.dmd_timesteps))
            raise UserError(
                f"DMD sampling runs exactly {len(params.dmd_timesteps)} steps (timesteps {steps}): "
                "drop `num_inference_steps`",
                field="num_inference_steps",
            )
        if params.guidance_scale > 1:
            raise UserError(
                "DMD sampling (FastWan) runs without CFG: drop `guidance_scale` or set it to 1", field="guidance_scale"
            )

    return [
        frames_are_4k_plus_1, size_fits_patches, second_guidance_needs_two_experts, image_fits_the_model,
        experts_are_there, text_length_fits_image_attention, dmd_is_complete,
    ]  # fmt: skip


def wan_given_rules(given: set[str], params: WanSampling) -> None:
    """Fields that a request without CFG would silently ignore are refused."""
    if params.guidance_scale > 1:
        return
    for name in ("negative_prompt", "guidance_scale_2"):
        if name in given:
            raise UserError(f"`{name}` is used only with CFG: add `guidance_scale` > 1 (e.g. 5)", field=name)


def guidance_cfg(params: WanSampling) -> float | None:
    return params.guidance_scale if params.guidance_scale > 1 else None


def wan_batch_key(params: WanSampling) -> Hashable | None:
    """Text-to-video requests share a batch when all but their rows agree (prompt, negative prompt,
    seed; the fps only labels the output). Never batched: a request with an input image (its
    conditioning is per request) or with DMD sampling (it re-noises from its own seeded stream)."""
    if params.image_path is not None or params.sampler == "dmd":
        return None
    return replace(params, prompt="", negative_prompt=None, seed=0, fps=None)
