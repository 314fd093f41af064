"""Which model family serves a checkpoint, by model_index.json's `_class_name`. The built-in
families are the packages under sgdiff/families/, each registering itself when imported; a caller
may register its own (register_family). Adding a family edits no file here."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgdiff.errors import UserError
from sgdiff.models.loading import read_json, safetensors_files
from sgdiff.pipeline.family import ModelFamily
from sgdiff.sampling import broken_rule, sampling_fields

_FAMILIES: dict[str, ModelFamily] = {}  # by the pipeline class it serves
_discovered = False


def register_family(family: ModelFamily) -> ModelFamily:
    """Serve `family.pipeline_classes` with `family` (a later registration of a class replaces it)."""
    for pipeline_class in family.pipeline_classes:
        _FAMILIES[pipeline_class] = family
    return family


def unregister_family(family: ModelFamily) -> None:
    for pipeline_class in family.pipeline_classes:
        if _FAMILIES.get(pipeline_class) is family:
            del _FAMILIES[pipeline_class]


def families() -> dict[str, ModelFamily]:
    """Every registered family by the pipeline class it serves (the built-in ones imported first)."""
    global _discovered
    if not _discovered:
        _discovered = True
        import sgdiff.families as package

        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(_FAMILIES)


def family_named(name: str) -> ModelFamily:
    return next(f for f in families().values() if f.name == name)


def family_of_field(name: str) -> ModelFamily | None:
    """A registered family whose requests carry the field `name`."""
    return next(iter(families_of_field(name)), None)


def families_of_field(name: str) -> list[ModelFamily]:
    """The registered families whose requests carry the field `name`, each once."""
    found: list[ModelFamily] = []
    for family in families().values():
        if name in sampling_fields(family.sampling) and family not in found:
            found.append(family)
    return found


def check_given_values(values: Mapping[str, Any]) -> None:
    """Values given before the model is known (flags), each checked by the rules of the families that
    declare its field: a value no family takes fails before any checkpoint is looked at; one that some
    family takes waits for the model's own check."""
    for name, value in values.items():
        check_given_value(name, value)


def check_given_value(name: str, value: Any) -> None:
    """Refuse `value` for the field `name` when no family that declares the field takes it, saying
    each family's rule where they differ."""
    broken: dict[str, list[str]] = {}  # rule -> the families that have it
    for family in sorted(families_of_field(name), key=lambda f: f.name):
        rule = broken_rule(family.sampling, name, value)
        if rule is None:
            return
        broken.setdefault(rule, []).append(family.name)
    if len(broken) == 1:
        raise UserError(f"`{name}` {next(iter(broken))}, got {value}", field=name)
    if broken:
        rules = "; ".join(f"{rule} for {spoken_list(names)} models" for rule, names in broken.items())
        raise UserError(f"`{name}` {rules}; got {value}", field=name)


def spoken_list(names: list[str]) -> str:
    """Names as a sentence lists them: a; a and b; a, b and c."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


@dataclass(frozen=True)
class ModelInfo:
    """What the small JSON files of a checkpoint say (no weights read)."""

    model_dir: Path
    pipeline_class: str
    model_index: dict[str, Any]
    transformer_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    vae_config: dict[str, Any]

    @property
    def family(self) -> ModelFamily:
        return families()[self.pipeline_class]


def inspect_model(model_dir: Path) -> ModelInfo:
    """Read the small JSON files that decide the pipeline and preset (no weights)."""
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{model_dir} has no model_index.json: give a diffusers-format checkpoint folder")
    index = read_json(index_path)
    pipeline_class = str(index.get("_class_name", ""))
    if pipeline_class not in families():
        supported = ", ".join(sorted(families()))
        raise UserError(f"pipeline '{pipeline_class}' in {index_path} is not supported (supported: {supported})")
    check_components(model_dir, index)
    scheduler_path = model_dir / "scheduler" / "scheduler_config.json"
    vae_path = model_dir / "vae" / "config.json"
    return ModelInfo(
        model_dir=model_dir,
        pipeline_class=pipeline_class,
        model_index=index,
        vae_config=read_json(vae_path) if vae_path.is_file() else {},
        transformer_config=read_json(transformer_config_path(model_dir)),
        scheduler_config=read_json(scheduler_path) if scheduler_path.is_file() else {},
    )


def transformer_config_path(model_dir: Path) -> Path:
    """transformer/config.json, or transformer_2's when a checkpoint ships only the second expert."""
    first = model_dir / "transformer" / "config.json"
    second = model_dir / "transformer_2" / "config.json"
    return second if not first.is_file() and second.is_file() else first


# (a guider, e.g. HunyuanVideo-1.5's ClassifierFreeGuidance, is a config only)
WEIGHTLESS_CLASS_SUFFIXES = ("Tokenizer", "TokenizerFast", "Scheduler", "Processor", "FeatureExtractor", "Guidance")


def check_components(model_dir: Path, index: dict[str, Any]) -> None:
    """Every part model_index.json names exists, and every part with weights has safetensors:
    a broken checkpoint fails before anything loads."""
    for name, entry in index.items():
        # lists name components; other values are pipeline settings (boundary_ratio, expand_timesteps, ...)
        if name.startswith("_") or not isinstance(entry, list) or entry == [None, None]:
            continue
        if not (len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise UserError(f"{model_dir / 'model_index.json'}: entry '{name}' should be [library, class], got {entry}")
        folder = model_dir / name
        if not folder.is_dir():
            raise UserError(f"{folder} is missing: model_index.json names a {name}/ folder")
        if not str(entry[1]).endswith(WEIGHTLESS_CLASS_SUFFIXES):
            safetensors_files(folder)
