"""What a HunyuanVideo-1.5 request may carry beyond the shared fields, and the rules that refuse what the model
cannot make or would silently ignore (text to video: HunyuanVideo15Pipeline; image to video:
HunyuanVideo15ImageToVideoPipeline)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sgdiff.errors import UserError
from sgdiff.families.hunyuan_video.sampling import frame_and_size_rules
from sgdiff.io.input_image import check_image_path
from sgdiff.pipeline.stages.validation import ValidationRule
from sgdiff.sampling import SamplingParams, checked

MAX_FRAMES = 1001  # a guard against typos; HunyuanVideo-1.5 is trained on up to 121 frames
VAE_TEMPORAL_FACTOR = 4  # 4k+1 frames -> k+1 latent frames
MAX_TEXT_TOKENS = 1000  # diffusers' tokenizer_max_length: the Qwen2.5-VL tokens kept after the template's crop
IMAGE_TO_VIDEO = "HunyuanVideo15ImageToVideoPipeline"
TEXT_TO_VIDEO = "HunyuanVideo15Pipeline"


@dataclass(frozen=True)
class HunyuanVideo15Sampling(SamplingParams):
    # classifier-free guidance against `negative_prompt` (" " when none is given), as diffusers' guider runs it;
    # 1: no CFG (one forward a step). Unset: the checkpoint's guider/config.json (6, or 1 for CFG-distilled ones)
    guidance_scale: float = 6.0
    max_sequence_length: int = checked(  # the Qwen2.5-VL tokens kept after the template's first 108
        MAX_TEXT_TOKENS, lambda v: 1 <= v <= MAX_TEXT_TOKENS, f"must be between 1 and {MAX_TEXT_TOKENS}"
    )
    num_frames: int = checked(121, lambda v: 1 <= v <= MAX_FRAMES, f"must be between 1 and {MAX_FRAMES}")
    num_frames_round_down: bool = False  # a frame count that is not 4k+1 is rounded down instead of refused
    fps: int | None = checked(None, lambda v: 1 <= v <= 240, "must be between 1 and 240")  # None: the preset's
    image_path: str | None = None  # image-to-video: the first frame, a local file or an http(s) URL


def guidance_cfg(params: HunyuanVideo15Sampling) -> float | None:
    """As diffusers' ClassifierFreeGuidance: CFG unless the scale is 1 (math.isclose)."""
    return None if math.isclose(params.guidance_scale, 1.0) else params.guidance_scale


def spatial_factor(vae_config: dict[str, Any]) -> int:
    return int(vae_config.get("spatial_compression_ratio", 16))


def hunyuan_video15_given_rules(given: set[str], params: HunyuanVideo15Sampling) -> None:
    """A negative prompt that a request without CFG would silently ignore is refused."""
    if "negative_prompt" in given and guidance_cfg(params) is None:
        raise UserError(
            "`negative_prompt` is used only with CFG: add `guidance_scale` other than 1 (e.g. 6)",
            field="negative_prompt",
        )


def hunyuan_video15_rules(
    pipeline_class: str, transformer_config: dict[str, Any], vae_config: dict[str, Any]
) -> list[ValidationRule]:
    """From the checkpoint's configs: frames that fill the VAE's latent frames, sizes that fill its latent pixels
    and the transformer's patches (16 x 1), and an input image exactly where the pipeline takes one."""
    multiple = spatial_factor(vae_config) * int(transformer_config.get("patch_size", 1))
    if int(vae_config.get("temporal_compression_ratio", VAE_TEMPORAL_FACTOR)) != VAE_TEMPORAL_FACTOR:
        raise UserError("this HunyuanVideo-1.5 VAE does not compress time by 4, which sgdiff's pipeline assumes")
    image_to_video = pipeline_class == IMAGE_TO_VIDEO

    def image_fits_the_model(params: HunyuanVideo15Sampling) -> None:
        if image_to_video and params.image_path is None:
            raise UserError(
                "this image-to-video model needs `image_path`: the first frame, a file or an http(s) URL",
                field="image_path",
            )
        if params.image_path is not None:
            if not image_to_video:
                raise UserError(
                    f"`image_path`: {pipeline_class} makes video from text only; use an image-to-video checkpoint "
                    "(e.g. hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v)",
                    field="image_path",
                )
            check_image_path(params.image_path)

    return [*frame_and_size_rules(multiple), image_fits_the_model]
