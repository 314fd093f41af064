"""The values a HunyuanVideo-1.5 request leaves unset, as diffusers' pipelines choose them: the output size
from an aspect ratio at the transformer's `target_size` (16:9 for text to video, the input image's for image
to video, which diffusers always sizes so), and the CFG scale from the checkpoint's guider."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from sgdiff.errors import UserError
from sgdiff.families.hunyuan_video15.sampling import IMAGE_TO_VIDEO, HunyuanVideo15Sampling, spatial_factor
from sgdiff.io.input_image import load_image
from sgdiff.models.loading import read_json

DEFAULT_ASPECT = (9, 16)  # (height, width) of a text-to-video request without a size
MAX_ASPECT_RATIO = 4.0  # the buckets' longest side at most 4 times the shortest
GUIDER = "ClassifierFreeGuidance"
GUIDER_DEFAULT_SCALE = 7.5  # ClassifierFreeGuidance's, where its config names none
# the guider options sgdiff's CFG has no choice for, at the values under which diffusers' guider is plain CFG
PLAIN_GUIDER = {"enabled": True, "guidance_rescale": 0.0, "use_original_formulation": False, "start": 0.0, "stop": 1.0}


def size_buckets(target_size: int, cell: int) -> list[tuple[int, int]]:
    """The (height, width) pairs, multiples of `cell`, of about target_size^2 pixels and an aspect ratio of at
    most 4, in the order diffusers' generate_crop_size_list lists them (its ties go to the first): a walk over
    cell counts (rows, cols) from (n, 1), adding a column while rows x cols stays within n = (target / cell)^2
    cells, else dropping a row."""
    cells = round((target_size / cell) ** 2)
    buckets = []
    rows, cols = cells, 1
    while rows > 0:
        if max(rows, cols) / min(rows, cols) <= MAX_ASPECT_RATIO:
            buckets.append((rows * cell, cols * cell))
        if (cols + 1) * rows <= cells:
            cols += 1
        else:
            rows -= 1
    return buckets


def bucket_size(height: float, width: float, target_size: int, cell: int) -> tuple[int, int]:
    """(height, width) of the bucket nearest in aspect ratio to height x width, no flatter than it when it is
    landscape and no taller when portrait (diffusers' get_closest_ratio; ratios rounded to 5 digits as there)."""
    buckets = size_buckets(target_size, cell)
    aspect = float(height) / float(width)
    differences = [round(h / w, 5) - aspect for h, w in buckets]
    allowed = [i for i, d in enumerate(differences) if (d <= 0 if aspect >= 1 else d >= 0)]
    return buckets[min(allowed, key=lambda i: abs(differences[i]))]


def output_size(info: Any, params: HunyuanVideo15Sampling, unset: frozenset[str]) -> HunyuanVideo15Sampling:
    """`height` and `width` the request leaves unset: image to video from the input image's aspect ratio, text
    to video 16:9, at the transformer's target_size (480x848 at 640, 720x1280 at 960). Both or neither: as
    diffusers, one without the other is refused."""
    missing = {"height", "width"} & unset
    if not missing:
        return params
    if len(missing) == 1:
        given = ({"height", "width"} - missing).pop()
        raise UserError(
            f"`{given}` needs `{missing.pop()}` too: give both, or neither for the model's size", field=given
        )
    target = int(info.transformer_config.get("target_size", 640))
    cell = spatial_factor(info.vae_config)
    if info.pipeline_class != IMAGE_TO_VIDEO:
        height, width = bucket_size(*DEFAULT_ASPECT, target, cell)
    elif params.image_path is None:
        return params  # (the rules refuse the request: it needs an image)
    else:
        image_width, image_height = load_image(params.image_path, {}).size
        height, width = bucket_size(image_height, image_width, target, cell)
    return replace(params, height=height, width=width)


def guider_config(model_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's guider/guider_config.json (None: it has none), refused where its options ask for more
    than plain CFG, which is all the released checkpoints' guiders do."""
    folder = model_dir / "guider"
    path = next((folder / name for name in ("guider_config.json", "config.json") if (folder / name).is_file()), None)
    if path is None:
        return None
    raw = read_json(path)
    if raw.get("_class_name", GUIDER) != GUIDER:
        raise UserError(
            f"{path}: guider {raw['_class_name']} is not supported for HunyuanVideo-1.5 (supported: {GUIDER})"
        )
    for key, plain in PLAIN_GUIDER.items():
        if raw.get(key, plain) != plain:
            raise UserError(f"{path}: guider option {key}={raw[key]!r} is not supported (sgdiff runs plain CFG)")
    return raw


def default_guidance(info: Any, params: HunyuanVideo15Sampling, unset: frozenset[str]) -> HunyuanVideo15Sampling:
    """An unset `guidance_scale` is the checkpoint guider's (6 for the released models, 1 for CFG-distilled ones)."""
    config = guider_config(info.model_dir)
    if "guidance_scale" not in unset or config is None:
        return params
    return replace(params, guidance_scale=float(config.get("guidance_scale", GUIDER_DEFAULT_SCALE)))
