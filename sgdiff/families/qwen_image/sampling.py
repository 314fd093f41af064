"""What a Qwen-Image request may carry beyond the shared fields (the Edit pipelines: their input images),
and the rules that refuse what Qwen-Image cannot do or would silently ignore."""

from __future__ import annotations

from dataclasses import dataclass

from sgdiff.errors import UserError
from sgdiff.pipeline.stages.validation import ValidationRule
from sgdiff.sampling import SamplingParams, checked

MAX_TEXT_TOKENS = 1024  # diffusers' QwenImagePipeline refuses a longer max_sequence_length


@dataclass(frozen=True)
class QwenImageSampling(SamplingParams):
    # true classifier-free guidance against `negative_prompt`, as diffusers' QwenImagePipeline runs it (its
    # default 4.0 applies only where a negative prompt is given)
    true_cfg_scale: float = checked(4.0, lambda v: v >= 1, "must be >= 1")
    max_sequence_length: int = checked(
        512, lambda v: 1 <= v <= MAX_TEXT_TOKENS, f"must be between 1 and {MAX_TEXT_TOKENS}"
    )
    # the Edit pipelines' input images (local files or http(s) URLs), in the order the prompt names them
    image_path: tuple[str, ...] | None = None


def vae_scale_factor(vae_config: dict) -> int:
    """The VAE's spatial downsampling, as diffusers' pipeline reads it: 2 per temporal-downsample entry."""
    return 2 ** len(vae_config.get("temperal_downsample", (False, True, True)))


def true_cfg_scale_of(params: QwenImageSampling) -> float | None:
    """As diffusers: true CFG when a negative prompt is given (even an empty one) and the scale is > 1."""
    return params.true_cfg_scale if params.negative_prompt is not None and params.true_cfg_scale > 1 else None


def qwen_image_rules(vae_scale_factor: int, shift_terminal: float | None = None) -> list[ValidationRule]:
    """`vae_scale_factor`: the VAE's spatial downsampling; the latents are then packed in 2x2 patches.
    `shift_terminal`: the scheduler's (Qwen-Image's 0.02), where the sigmas are stretched to end."""
    multiple = 2 * vae_scale_factor

    def size_fits_patches(params: QwenImageSampling) -> None:
        # diffusers would round such a size down with a warning: the image would not have the size asked for
        for name, value in (("height", params.height), ("width", params.width)):
            if value % multiple:
                raise UserError(f"`{name}` must be a multiple of {multiple} for this model, got {value}", field=name)

    def steps_can_stretch(params: QwenImageSampling) -> None:
        # one sigma (1.0) cannot be stretched to end at shift_terminal: diffusers' schedule is NaN there
        if shift_terminal and params.num_inference_steps < 2:
            raise UserError(
                f"`num_inference_steps` must be at least 2 for this model (its schedule ends at shift_terminal "
                f"{shift_terminal:g}), got {params.num_inference_steps}",
                field="num_inference_steps",
            )

    return [size_fits_patches, steps_can_stretch]


def qwen_image_given_rules(given: set[str], params: QwenImageSampling) -> None:
    """Fields given explicitly that this request would silently ignore are refused."""
    if "max_sequence_length" in given and params.image_path:
        raise UserError(
            "`max_sequence_length` does not apply to the Qwen-Image-Edit models: diffusers' Edit pipelines keep every "
            "token of the prompt and its images",
            field="max_sequence_length",
        )
    if "guidance_scale" in given:
        raise UserError(
            "`guidance_scale` does not apply to Qwen-Image (it embeds no guidance): guide with `negative_prompt` "
            "and `true_cfg_scale`",
            field="guidance_scale",
        )
    if "negative_prompt" in given and params.true_cfg_scale <= 1:
        raise UserError(
            "`negative_prompt` is used only with true CFG: set `true_cfg_scale` > 1 (e.g. 4)", field="negative_prompt"
        )
    if "true_cfg_scale" in given and params.true_cfg_scale > 1 and params.negative_prompt is None:
        raise UserError(
            '`true_cfg_scale` needs a `negative_prompt` (Qwen-Image runs true CFG against it; " " will do)',
            field="true_cfg_scale",
        )
