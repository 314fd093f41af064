"""What diffusers' two Qwen-Image Edit pipelines take besides a prompt, and how they size it:
QwenImageEditPipeline (Qwen-Image-Edit) edits one image, QwenImageEditPlusPipeline (Qwen-Image-Edit-2509,
-2511) several. Each input image is resized, keeping its aspect ratio, to about 1024x1024 pixels for the
VAE (its latents join the noise tokens) and to about the same (Edit) or 384x384 pixels (Edit Plus) for the
Qwen2.5-VL text encoder, which reads them inside the prompt. Without a height and width, the output takes
the aspect ratio of the first image (Edit) or the last one (Edit Plus) at about 1024x1024 pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sgdiff.errors import UserError
from sgdiff.families.qwen_image.sampling import QwenImageSampling
from sgdiff.io.input_image import check_image_path, is_url, load_image
from sgdiff.pipeline.stages.validation import ValidationRule
from sgdiff.sampling import MAX_SIZE

VAE_AREA = 1024 * 1024  # pixels of each input image the VAE encodes, and of an output sized from one
SIZE_STEP = 32  # the sizes diffusers' calculate_dimensions gives are multiples of 32
# Edit Plus: diffusers sets no limit; Qwen-Image-Edit-2509's model card reports its best results with 1 to 3
# input images, and each one adds about 4096 image tokens (and its VL tokens) to every step
MAX_EDIT_PLUS_IMAGES = 3
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses images longer than 200 times their width


@dataclass(frozen=True)
class EditVariant:
    """What sets the two Edit pipelines apart."""

    pipeline_class: str
    max_images: int
    numbered: bool  # the prompt names its images "Picture 1: ...", "Picture 2: ..." (Edit Plus)
    vl_area: int  # pixels of each image the text encoder reads
    sized_by: int  # the image whose aspect ratio sets an output size not given: 0 (first) or -1 (last)


EDIT = EditVariant("QwenImageEditPipeline", max_images=1, numbered=False, vl_area=VAE_AREA, sized_by=0)
EDIT_PLUS = EditVariant(
    "QwenImageEditPlusPipeline", max_images=MAX_EDIT_PLUS_IMAGES, numbered=True, vl_area=384 * 384, sized_by=-1
)
EDIT_VARIANTS = {variant.pipeline_class: variant for variant in (EDIT, EDIT_PLUS)}


def sized_to_area(area: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) of about `area` pixels at the aspect ratio of width x height, each a multiple of 32
    (diffusers' calculate_dimensions, its arithmetic in the same order)."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    new_height = new_width / ratio
    return round(new_width / SIZE_STEP) * SIZE_STEP, round(new_height / SIZE_STEP) * SIZE_STEP


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image at `path` (a file or URL: read once, see io/input_image.py)."""
    return load_image(path, {}).size


def output_size_from_image(
    variant: EditVariant, params: QwenImageSampling, unset: frozenset[str], multiple: int
) -> QwenImageSampling:
    """`height` and `width` that the request leaves unset, as diffusers sizes them: from the aspect ratio
    of the variant's sizing image at VAE_AREA pixels, then rounded down to `multiple` (the packed latents'
    cell)."""
    if not {"height", "width"} & unset or not params.image_path:
        return params
    source = params.image_path[variant.sized_by]
    (width, height), _ = edit_sizes(variant, source, *image_size(source))
    width, height = width // multiple * multiple, height // multiple * multiple
    if not (0 < width <= MAX_SIZE and 0 < height <= MAX_SIZE):
        raise UserError(
            f"`image_path` {source}: its aspect ratio gives an output of {width}x{height} pixels; give `height` "
            f"and `width` (multiples of {multiple}, at most {MAX_SIZE})",
            field="image_path",
        )
    return replace(
        params,
        height=height if "height" in unset else params.height,
        width=width if "width" in unset else params.width,
    )


def edit_image_rules(pipeline_class: str) -> list[ValidationRule]:
    """A text-to-image checkpoint takes no image; an Edit one needs 1 (Edit) or 1 to 3 (Edit Plus), each a
    readable image (local files checked here, URLs when fetched) of a shape the text encoder can read."""
    variant = EDIT_VARIANTS.get(pipeline_class)

    def images_fit_the_model(params: QwenImageSampling) -> None:
        paths = params.image_path or ()
        if variant is None:
            if paths:
                raise UserError(
                    f"`image_path`: {pipeline_class} makes images from text only; to edit images use a "
                    "Qwen-Image-Edit checkpoint (e.g. Qwen/Qwen-Image-Edit-2509)",
                    field="image_path",
                )
            return
        if not paths:
            raise UserError(
                f"this edit model ({pipeline_class}) needs `image_path`: the image to edit, a file or an http(s) URL",
                field="image_path",
            )
        if len(paths) > variant.max_images:
            most = "one image" if variant.max_images == 1 else f"at most {variant.max_images} images"
            hint = "" if variant.max_images > 1 else " (Qwen-Image-Edit-2509 and -2511 take several)"
            raise UserError(f"`image_path`: {pipeline_class} takes {most}, got {len(paths)}{hint}", field="image_path")
        for path in paths:
            check_image_path(path)
            if not is_url(path):  # (a URL's image is checked once fetched)
                edit_sizes(variant, path, *image_size(path))

    return [images_fit_the_model]


def edit_sizes(variant: EditVariant, path: str, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(width, height) of the image at `path` as the VAE encodes it, and as the text encoder reads it;
    refused where either would be empty, or too long for Qwen2-VL's image processor."""
    vae, vl = sized_to_area(VAE_AREA, width, height), sized_to_area(variant.vl_area, width, height)
    if min(*vae, *vl) == 0 or max(vl) > MAX_ASPECT_RATIO * min(vl):
        raise UserError(
            f"`image_path` {path} is {width}x{height} pixels, too long for the model's vision encoder (at most "
            f"about {MAX_ASPECT_RATIO} times longer than wide): crop it",
            field="image_path",
        )
    return vae, vl
