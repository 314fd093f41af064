"""Requests as OpenAI's Images and Videos APIs shape them (JSON, or multipart form fields and file
parts), turned into the engine's fields. sgdiff's own fields ride alongside under their library names
(seed, num_inference_steps, guidance_scale, true_cfg_scale, negative_prompt, num_frames, fps, ...),
as SGLang does; each is checked by the engine, whose errors name the field as `param`. `lora` or `loras` pick
the LoRA adapters the server loaded (take_loras)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from sgdiff.sampling import SamplingParams, field_kinds, item_kinds
from sgdiff.server.errors import ApiError

SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
# OpenAI fields that change what OpenAI's own models draw and that sgdiff's models have no knob for:
# refused by name rather than silently ignored.
UNSUPPORTED = ("quality", "style", "background", "moderation", "output_compression", "partial_images", "stream",
               "input_fidelity", "mask", "complexity", "frame_count", "frame_duration_ms", "svg", "markup")  # fmt: skip
# Library fields a client gives under OpenAI's name (or not at all).
SERVER_OWNED = {
    "num_outputs_per_prompt": "use `n`",
    "image_path": "upload the image as a file part (`input_reference` for videos, `image` for edits); the server "
    "reads no file of its own and fetches no URL for a client",
}


@dataclass
class Upload:
    """A file part of a multipart request."""

    name: str  # the form field (image, input_reference)
    filename: str | None
    content: bytes


@dataclass
class Body:
    """A request's fields (JSON values, or the strings of a form) and its file parts."""

    fields: dict[str, Any]
    uploads: list[Upload] = field(default_factory=list)
    from_form: bool = False


def parse_json(raw: bytes) -> Body:
    if not raw.strip():
        raise ApiError(400, "the request has no body: send a JSON object with at least `prompt`", None, "invalid_json")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc}); send a JSON object", None, "invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, 'the body must be a JSON object, e.g. {"prompt": "a red cube"}', None, "invalid_json")
    return Body(value)


def take_prompt(body: Body) -> str:
    prompt = body.fields.pop("prompt", None)
    if prompt is None:
        raise ApiError(400, "`prompt` is missing: describe what to generate", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise ApiError(400, f"`prompt` must be a string, got {type(prompt).__name__}", "prompt", "invalid_type")
    if not prompt.strip():
        raise ApiError(400, "`prompt` is empty: describe what to generate", "prompt", "invalid_value")
    return prompt


def take_int(body: Body, name: str, default: int | None, low: int, high: int, why: str) -> int | None:
    """An integer field between `low` and `high` (`why` says where `high` comes from)."""
    value = body.fields.pop(name, None)
    if value is None:
        return default
    if body.from_form and isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"`{name}` must be an integer, got {value!r}", name, "invalid_type")
    if not low <= value <= high:
        raise ApiError(400, f"`{name}` must be between {low} and {high} ({why}), got {value}", name, "invalid_value")
    return value


def take_size(body: Body, max_side: int) -> tuple[int, int] | None:
    """OpenAI's "WIDTHxHEIGHT" (or "auto": the model's default) as (height, width)."""
    size = body.fields.pop("size", None)
    if size is None or size == "auto":
        return None
    match = SIZE.match(size) if isinstance(size, str) else None
    if match is None:
        raise ApiError(400, f"`size` must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got {size!r}", "size",
                       "invalid_value")  # fmt: skip
    width, height = int(match.group(1)), int(match.group(2))
    if not (0 < width <= max_side and 0 < height <= max_side):
        raise ApiError(400, f"`size` {width}x{height}: each side must be between 1 and {max_side} (the server's "
                       "--max-size)", "size", "invalid_value")  # fmt: skip
    return height, width


def take_model(body: Body, served: str) -> None:
    model = body.fields.pop("model", None)
    if model is not None and model != served:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {served!r} (GET /v1/models)",
                       "model", "model_not_found")  # fmt: skip


def refuse_unsupported(body: Body) -> None:
    for name in UNSUPPORTED:
        if body.fields.get(name) not in (None, "auto", False):  # (e.g. "stream": false asks for what is done)
            raise ApiError(400, f"`{name}` is not supported by sgdiff's models; leave it out", name, "unsupported")
    for name in UNSUPPORTED:
        body.fields.pop(name, None)
    for name, why in SERVER_OWNED.items():
        if name in body.fields:
            raise ApiError(400, f"`{name}` cannot be given to the server: {why}", name, "invalid_value")
    body.fields.pop("user", None)  # a client's end-user id, for OpenAI's abuse monitoring: nothing to do here


def take_loras(body: Body) -> tuple[list[tuple[str, float | None]] | None, str | None]:
    """`lora` (an adapter's name) or `loras` (a list of {"name", "scale"}, the scale optional; in a form, JSON
    text): the LoRA adapters the request runs with, by the names GET /v1/loras lists (no scale: the adapter's
    own). Returns them as (name, scale) pairs and the field that gave them; (None, None) when neither is given."""
    lora, loras = body.fields.pop("lora", None), body.fields.pop("loras", None)
    if lora is not None and loras is not None:
        raise ApiError(400, "give `lora` (one adapter) or `loras` (a list), not both", "loras", "invalid_value")
    if lora is not None:
        if not isinstance(lora, str) or not lora.strip():
            raise ApiError(400, f"`lora` must be the name of a LoRA adapter (GET /v1/loras lists them), got {lora!r}",
                           "lora", "invalid_type")  # fmt: skip
        return [(lora, None)], "lora"
    if loras is None:
        return None, None
    if body.from_form and isinstance(loras, str):
        try:
            loras = json.loads(loras)
        except json.JSONDecodeError:
            raise ApiError(400, 'in a form, `loras` is JSON text, e.g. [{"name": "style", "scale": 0.8}]', "loras",
                           "invalid_value") from None  # fmt: skip
    shape = '`loras` must be a list of objects {"name": ..., "scale": ...} (scale optional)'
    if not isinstance(loras, list):
        raise ApiError(400, f"{shape}, got {loras!r}", "loras", "invalid_type")
    wanted: list[tuple[str, float | None]] = []
    for item in loras:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "scale"}:
            raise ApiError(400, f"{shape}, got the item {item!r}", "loras", "invalid_type")
        scale = item.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):  # fmt: skip
            raise ApiError(400, f"`loras`: the scale of {item['name']!r} must be a finite number, got {scale!r}",
                           "loras", "invalid_value")  # fmt: skip
        wanted.append((item["name"], None if scale is None else float(scale)))
    return wanted, "loras"


def sampling_fields(body: Body, sampling: type[SamplingParams]) -> dict[str, Any]:
    """What is left of the body: the engine's sampling fields. A form's strings become their field's
    type (JSON values are checked by the engine as they are); NaN and infinities are refused here."""
    kinds, items = field_kinds(sampling), item_kinds(sampling)  # type: ignore[arg-type]  # mypy bug: a class is Hashable
    fields = {}
    for name, value in body.fields.items():
        if body.from_form and isinstance(value, str) and name in kinds:
            value = from_form(name, value, kinds[name], items.get(name, int))
        if isinstance(value, float) and not math.isfinite(value):
            raise ApiError(400, f"`{name}` must be a finite number, got {value}", name, "invalid_value")
        if isinstance(value, (dict, list)) and kinds.get(name) is not tuple:
            raise ApiError(400, f"`{name}` must be a single value, got {type(value).__name__}", name, "invalid_type")
        fields[name] = value
    return fields


def from_form(name: str, text: str, kind: type, item: type = int) -> Any:
    """`item`: the items' type of a tuple field (comma-separated in a form)."""
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is tuple:
            return tuple(item(part) for part in text.split(","))
        return kind(text) if kind in (int, float) else text
    except ValueError:
        raise ApiError(400, f"`{name}` must be {kind.__name__}, got {text!r}", name, "invalid_type") from None
