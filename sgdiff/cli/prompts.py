"""--prompt-file: plain text, one prompt per line, or JSON Lines (a file name ending in .jsonl): one JSON
object per line, its "prompt" and the fields that line sets for its own request, over the flags. Every
line is read and checked here, before any weight loads; an error names the file, the line and the field."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgdiff.cli.errors import fail, flag
from sgdiff.errors import UserError

MAX_PROMPTS = 100_000  # a run's paths and requests are planned up front: beyond this, split the file
JSONL_SUFFIX = ".jsonl"
# What a JSON Lines line may set besides its prompt, by the library's names (num_frames: video models).
LINE_FIELDS = ("seed", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "num_frames")
BYTE_ORDER_MARK = "\ufeff".encode()
EXAMPLE = 'an object such as {"prompt": "a red cube", "seed": 7}'


@dataclass(frozen=True)
class PromptLine:
    """A line of a JSON Lines --prompt-file: where it is (FILE:LINE) and the fields it sets besides its
    prompt (library names), which override the flags for its request alone."""

    origin: str
    fields: dict[str, Any] = field(default_factory=dict)

    def spell(self, name: str, other: Callable[[str], str] = flag) -> str:
        """A field named in a message: as the line's JSON key where the line sets it, else as `other`."""
        return f'"{name}"' if name == "prompt" or name in self.fields else other(name)

    @contextmanager
    def blamed(self) -> Iterator[None]:
        """A UserError raised inside says this line, and names its fields as the line spells them."""
        try:
            yield
        except UserError as exc:
            raise UserError(f"{self.origin}: {exc.render(self.spell)}", field=exc.field) from None


# Given fields that do not change the images (how many there are: each gets its own _k name already)
NOT_IN_NAMES = ("seed", "num_outputs_per_prompt")


def name_fields(
    flags: dict[str, Any], line: PromptLine | None, model: str, loras: Sequence[tuple[str, float | None]] = ()
) -> dict[str, Any]:
    """What sets a request's default file name apart besides its prompt and seed: the model it runs on (as
    named: --model-path, its default, or the server's), every sampling field given explicitly (the
    flags, then the prompt file line's own) and the LoRA adapters it runs with (by name, as requests name
    them, and scale; None: a server's own). Runs that differ in any of them (steps, frames, size, model,
    adapters, ...) write files of their own; the same command again writes the same files. Local and
    --server runs name alike: both know the same flags, model and adapter names."""
    fields = {**flags, **(line.fields if line is not None else {}), "model": model}
    if loras:
        fields["loras"] = [[name, scale] for name, scale in loras]
    return {name: str(value) if isinstance(value, Path) else value for name, value in fields.items()
            if name not in NOT_IN_NAMES}  # fmt: skip


def read_prompt_file(path: Path) -> tuple[list[str], list[PromptLine]]:
    """The prompts of `path` and, for a .jsonl file, each one's line (else an empty list)."""
    if path.is_dir():
        fail(f"--prompt-file {path} is a folder; give a text file with one prompt per line")
    if not path.exists():  # (a pipe is read too: --prompt-file /dev/stdin or <(grep cat prompts.txt))
        fail(f"--prompt-file {path} does not exist")
    try:
        data = path.read_bytes().removeprefix(BYTE_ORDER_MARK)
    except OSError as exc:
        fail(f"--prompt-file {path} cannot be read ({exc.strerror})")
    if path.name.lower().endswith(JSONL_SUFFIX):
        prompts, lines = read_json_lines(path, data)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            fail(f"--prompt-file {path} is not UTF-8 text")
        prompts, lines = [line.strip() for line in text.splitlines() if line.strip()], []
        check_count(path, len(prompts))
    if not prompts:
        fail(f"--prompt-file {path} has no prompts (one per line)")
    return prompts, lines


def check_count(path: Path, count: int) -> None:
    if count > MAX_PROMPTS:
        fail(f"--prompt-file {path} has {count} prompts; a run takes at most {MAX_PROMPTS}: split it")


def read_json_lines(path: Path, data: bytes) -> tuple[list[str], list[PromptLine]]:
    """One JSON object per non-blank line ("\\n" or "\\r\\n" ends a line)."""
    rows = [(number, row) for number, row in enumerate(data.split(b"\n"), start=1) if row.strip()]
    check_count(path, len(rows))
    prompts, lines = [], []
    for number, row in rows:
        prompt, line = parse_line(row, f"{path}:{number}")
        prompts.append(prompt)
        lines.append(line)
    return prompts, lines


def parse_line(row: bytes, origin: str) -> tuple[str, PromptLine]:
    try:
        text = row.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{origin}: not UTF-8 text (byte 0x{row[exc.start]:02x} at column {exc.start + 1})")
    try:
        entry = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        fail(f"{origin}: not valid JSON ({exc.msg} at column {exc.colno}); each line is {EXAMPLE}")
    except (ValueError, RecursionError) as exc:  # a key given twice, an integer of over 4300 digits, deep nesting
        fail(f"{origin}: not valid JSON ({exc})")
    if not isinstance(entry, dict):
        fail(f"{origin}: each line is {EXAMPLE}, not {json_kind(entry)}")
    if unknown := sorted(set(entry) - {"prompt", *LINE_FIELDS}):
        known = ", ".join(f'"{name}"' for name in LINE_FIELDS)
        fail(f'{origin}: unknown field "{unknown[0]}"; a line takes "prompt" and {known}')
    if "prompt" not in entry:
        fail(f'{origin}: no "prompt"; each line is {EXAMPLE}')
    prompt = entry.pop("prompt")
    line = PromptLine(origin, entry)
    if not isinstance(prompt, str):
        fail(f'{origin}: "prompt" must be a string, not {json_kind(prompt)}')
    if not prompt.strip():
        fail(f'{origin}: "prompt" is empty: describe what to generate')
    with line.blamed():
        check_line_fields(prompt, entry)
    return prompt, line


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if duplicate := next((key for key in keys if keys.count(key) > 1), None):
        raise ValueError(f'"{duplicate}" is given twice')
    return dict(pairs)


def json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def check_line_fields(prompt: str, fields: dict[str, Any]) -> None:
    """Each field's type and range by the rules of the model family that declares it, as the flags are
    checked (sgdiff.pipeline.registry.check_given_values), and the text fields' encoding."""
    from sgdiff.pipeline.registry import check_given_value, family_of_field
    from sgdiff.sampling import KINDS, check_text, check_types, field_kinds

    check_text("prompt", prompt)
    for name, value in fields.items():
        family = family_of_field(name)
        assert family is not None  # LINE_FIELDS are the built-in families' fields
        sampling = family.sampling
        kind = field_kinds(sampling)[name]  # type: ignore[arg-type]  # mypy bug: a class is Hashable
        if value is None:
            raise UserError(f"`{name}` must be {KINDS[kind]}, not null (leave it out for the flag's value)", field=name)
        check_types(sampling, {name: value})
        check_given_value(name, value)
        if kind is str:
            check_text(name, value)


def fields_for_output(kind: str) -> frozenset[str]:
    """Every field a request may carry to a model of some family that makes `kind` (image or video)."""
    from sgdiff.pipeline.registry import families
    from sgdiff.sampling import sampling_fields

    return frozenset().union(*(sampling_fields(f.sampling) for f in families().values() if f.output == kind))
