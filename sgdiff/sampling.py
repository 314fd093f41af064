"""What a request asks for: the sampling fields every model family shares (SamplingParams), which a
family extends with a dataclass of its own, and the one place where defaults, a preset and the
caller's values meet (`build_sampling_params`).

A field's rule is declared beside it (`checked`), its type is its annotation: generic code checks
any family's fields without naming one. Errors name fields in backticks (sgdiff.errors.UserError)."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any

from sgdiff.config import Preset, merge_layers
from sgdiff.errors import UserError

SIZE_MULTIPLE = 16
MAX_SIZE = 8192
FLOAT32_MAX = 3.4028234663852886e38  # the scales become float32 tensors
MAX_SEED = 2**64 - 1
MAX_STEPS = 10_000  # a guard against typos (the schedules' training grids have 1000 timesteps)
MAX_OUTPUTS_PER_PROMPT = 64  # one batch on the device; more, and the command would only run out of memory
MAX_SEQUENCE_LENGTH = 512  # T5's length in FLUX's training; diffusers refuses more too


def checked(default: Any, ok: Callable[[Any], bool], rule: str) -> Any:
    """A dataclass field whose given values must pass `ok`; `rule` completes "`name` ..." (e.g.
    "must be at least 1") in the error for one that does not."""
    return field(default=default, metadata={"check": (ok, rule)})


def _size_ok(value: int) -> bool:
    return 0 < value <= MAX_SIZE and value % SIZE_MULTIPLE == 0


SIZE_RULE = f"must be a positive multiple of {SIZE_MULTIPLE} up to {MAX_SIZE}"

# What a family's functions take where generic code calls them (stage callbacks, ModelFamily's methods): the
# family's own SamplingParams subclass. Typed Any, since a function of a subclass is no function of SamplingParams.
FamilyParams = Any


@dataclass(frozen=True)
class SamplingParams:
    """One generation request: a prompt and how to sample it (the fields every family has)."""

    prompt: str
    negative_prompt: str | None = None
    height: int = checked(1024, _size_ok, SIZE_RULE)
    width: int = checked(1024, _size_ok, SIZE_RULE)
    num_inference_steps: int = checked(28, lambda v: 1 <= v <= MAX_STEPS, f"must be between 1 and {MAX_STEPS}")
    guidance_scale: float = 3.5
    seed: int = checked(42, lambda v: 0 <= v <= MAX_SEED, f"must be between 0 and {MAX_SEED}")
    generator_device: str = checked("cpu", lambda v: v in ("cpu", "cuda"), "must be 'cpu' or 'cuda'")
    num_outputs_per_prompt: int = checked(
        1, lambda v: 1 <= v <= MAX_OUTPUTS_PER_PROMPT, f"must be between 1 and {MAX_OUTPUTS_PER_PROMPT}"
    )
    max_sequence_length: int = checked(
        512, lambda v: 1 <= v <= MAX_SEQUENCE_LENGTH, f"must be between 1 and {MAX_SEQUENCE_LENGTH}"
    )
    # the LoRA adapters the request runs with: (name, scale), in the engine's order, none at scale 0. Set by the
    # engine from its adapters and the request's choice (Engine.request's `loras`), never by a flag or a preset.
    loras: tuple[tuple[str, float], ...] = ()

    def validate(self) -> None:
        check_values(type(self), self.__dict__)
        for name, kind in field_kinds(type(self)).items():  # type: ignore[arg-type]  # mypy bug: a class is Hashable
            if kind is str:
                check_text(name, getattr(self, name))
            elif item_kinds(type(self)).get(name) is str:  # type: ignore[arg-type]  # (as above)
                for text in getattr(self, name) or ():
                    check_text(name, text)
        if not self.prompt.strip():
            raise UserError("the prompt is empty: describe what to generate in `prompt`", field="prompt")


def check_text(name: str, value: str | None) -> None:
    """Refuse text that is no text: bytes that are not UTF-8 (a shell's $'\\xff' arrives as the lone
    surrogate U+DCFF) or other lone surrogates (JSON's "\\ud800"), which no tokenizer takes."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(value[exc.start])
        escaped_byte = 0xDC80 <= bad <= 0xDCFF  # how Python hands on a byte that is not UTF-8
        what = f"byte 0x{bad - 0xDC00:02x}" if escaped_byte else f"U+{bad:04X}"
        raise UserError(
            f"`{name}` is not valid UTF-8: {what} at character {exc.start + 1}; pass the text in UTF-8", field=name
        ) from None


KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a list of integers"}
LIST_OF_STRINGS = "a list of strings"


@cache
def field_kinds(cls: type[SamplingParams]) -> dict[str, type]:
    """Each field's type as its annotation says (None allowed or not aside): int, float, str, bool or
    tuple (of ints, or of strings: item_kinds)."""
    return {name: typing.get_origin(hint) or hint for name, hint in _field_hints(cls).items()}


@cache
def item_kinds(cls: type[SamplingParams]) -> dict[str, type]:
    """The item type of each tuple field: int (e.g. timesteps) or str (e.g. several input files)."""
    return {
        name: typing.get_args(hint)[0] for name, hint in _field_hints(cls).items() if typing.get_origin(hint) is tuple
    }


def _field_hints(cls: type[SamplingParams]) -> dict[str, Any]:
    hints = {}
    for name, hint in typing.get_type_hints(cls).items():
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        hints[name] = hint
    return hints


def kind_text(cls: type[SamplingParams], name: str) -> str:
    """What a value of the field `name` must be, in words ("an integer", "a list of strings", ...)."""
    kind = field_kinds(cls)[name]  # type: ignore[arg-type]  # mypy bug: a class is Hashable
    if kind is tuple and item_kinds(cls)[name] is str:  # type: ignore[arg-type]  # (as above)
        return LIST_OF_STRINGS
    return KINDS[kind]


def sampling_fields(cls: type[SamplingParams]) -> frozenset[str]:
    """The fields a caller or preset may set (the prompt comes on its own, the adapters from the engine)."""
    return frozenset(f.name for f in fields(cls)) - {"prompt", "loras"}


def sampling_defaults(cls: type[SamplingParams]) -> dict[str, Any]:
    settable = sampling_fields(cls)
    return {f.name: f.default for f in fields(cls) if f.name in settable and f.default is not MISSING}


def _type_ok(kind: type, value: Any, item: type = int) -> bool:
    """`item`: the items' type of a tuple field."""
    if isinstance(value, bool) and kind is not bool:
        return False
    if kind is float:
        return isinstance(value, (int, float))
    if kind is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    return isinstance(value, kind)


def check_types(cls: type[SamplingParams], values: Mapping[str, Any], source: str = "") -> None:
    """Values from presets and callers have their field's type (a flag parser already ensures it);
    `source`, where they came from, opens the error."""
    kinds, items = field_kinds(cls), item_kinds(cls)  # type: ignore[arg-type]  # mypy bug: a class is Hashable
    for name, value in values.items():
        if value is not None and name in kinds and not _type_ok(kinds[name], value, items.get(name, int)):
            where = f"{source}: " if source else ""
            raise UserError(f"{where}`{name}` must be {kind_text(cls, name)}, got {value!r}", field=name)


def one_or_many(cls: type[SamplingParams], values: Mapping[str, Any]) -> dict[str, Any]:
    """Strings given as one value or as a list (a flag that may repeat): a string for a field of a list of
    strings becomes a list of one, a list of one string for a string field its string; a longer list
    for a string field is refused (the field takes one value for this model)."""
    kinds, items = field_kinds(cls), item_kinds(cls)  # type: ignore[arg-type]  # mypy bug: a class is Hashable
    fitted = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and kinds.get(name) is tuple and items[name] is str:
            fitted[name] = (value,)
        elif isinstance(value, (list, tuple)) and kinds.get(name) is str and all(isinstance(v, str) for v in value):
            if len(value) != 1:
                raise UserError(
                    f"`{name}` takes one value for this model, got {len(value)}: {', '.join(value)}", field=name
                )
            fitted[name] = value[0]
    return fitted


def check_values(cls: type[SamplingParams], values: Mapping[str, Any]) -> None:
    """Every rule `cls` declares, and finite 32-bit floats, for the values that are set."""
    for f in fields(cls):
        value = values.get(f.name)
        if value is not None and (rule := broken_rule(cls, f.name, value)) is not None:
            raise UserError(f"`{f.name}` {rule}, got {value}", field=f.name)


def broken_rule(cls: type[SamplingParams], name: str, value: Any) -> str | None:
    """The rule of `cls` that `value` breaks for its field `name` (e.g. "must be between 1 and 512"),
    or None when it keeps them all."""
    f = next(f for f in fields(cls) if f.name == name)
    kind = field_kinds(cls)[name]  # type: ignore[arg-type]  # mypy bug: a class is Hashable
    if kind is float and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        return "must be a finite number (a 32-bit float)"
    if "check" in f.metadata:
        ok, rule = f.metadata["check"]
        if not ok(value):
            return rule
    return None


def build_sampling_params(
    cls: type[SamplingParams], prompt: str, preset: Preset | None, given: Mapping[str, Any]
) -> SamplingParams:
    """The one place where defaults, the preset and the caller's values meet:
    `cls`'s defaults < the preset's [sampling] < `given` (None in `given` means not given)."""
    known = sampling_fields(cls)
    if unknown := sorted(set(given) - known):
        raise UserError(f"unknown sampling parameters {unknown}; known: {sorted(known)}", field=unknown[0])
    given = one_or_many(cls, given)
    check_types(cls, given, "sampling parameters")
    if preset is not None:
        if unknown := sorted(set(preset.sampling) - known):
            raise UserError(f"preset {preset.name}: unknown [sampling] keys {unknown} (known: {sorted(known)})")
        check_types(cls, preset.sampling, f"preset {preset.name} [sampling]")
    from_preset = preset.sampling if preset is not None else {}
    values = merge_layers(sampling_defaults(cls), from_preset, given)
    kinds = field_kinds(cls)  # type: ignore[arg-type]  # mypy bug: a class is Hashable
    values = {k: tuple(v) if kinds[k] is tuple and v is not None else v for k, v in values.items()}
    params = cls(prompt=prompt, **values)
    params.validate()
    return params
