"""Which pipeline serves a checkpoint, by model_index.json's `_class_name`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgdiff.errors import UserError
from sgdiff.models.loading import read_json, safetensors_files
from sgdiff.pipeline.base import ComposedPipeline
from sgdiff.pipeline.flux import flux_rules, load_flux_pipeline
from sgdiff.pipeline.schedule import FlowMatchSchedule
from sgdiff.pipeline.stages.validation import ValidationRule


@dataclass(frozen=True)
class PipelineSpec:
    """How to build one pipeline family."""

    # load(model_dir, device, dtype, schedule, events) -> ComposedPipeline
    load: Callable[..., ComposedPipeline]
    # rules(transformer_config) -> request checks, run before any weight loads
    rules: Callable[[dict[str, Any]], list[ValidationRule]]
    # schedule(merged scheduler options) -> the pipeline's schedule object; refuses what it cannot honour
    schedule: Callable[[dict[str, Any]], Any]


PIPELINES: dict[str, PipelineSpec] = {
    "FluxPipeline": PipelineSpec(load=load_flux_pipeline, rules=flux_rules, schedule=FlowMatchSchedule.from_dict),
}


@dataclass(frozen=True)
class ModelInfo:
    model_dir: Path
    pipeline_class: str
    transformer_config: dict[str, Any]
    scheduler_config: dict[str, Any]

    @property
    def spec(self) -> PipelineSpec:
        return PIPELINES[self.pipeline_class]


def inspect_model(model_dir: Path) -> ModelInfo:
    """Read the small JSON files that decide the pipeline and preset (no weights)."""
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{model_dir} has no model_index.json: give a diffusers-format checkpoint folder")
    index = read_json(index_path)
    pipeline_class = str(index.get("_class_name", ""))
    if pipeline_class not in PIPELINES:
        supported = ", ".join(sorted(PIPELINES))
        raise UserError(f"pipeline '{pipeline_class}' in {index_path} is not supported (supported: {supported})")
    check_components(model_dir, index)
    scheduler_path = model_dir / "scheduler" / "scheduler_config.json"
    return ModelInfo(
        model_dir=model_dir,
        pipeline_class=pipeline_class,
        transformer_config=read_json(model_dir / "transformer" / "config.json"),
        scheduler_config=read_json(scheduler_path) if scheduler_path.is_file() else {},
    )


WEIGHTLESS_CLASS_SUFFIXES = ("Tokenizer", "TokenizerFast", "Scheduler", "Processor", "FeatureExtractor")


def check_components(model_dir: Path, index: dict[str, Any]) -> None:
    """Every part model_index.json names exists, and every part with weights has safetensors:
    a broken checkpoint fails before anything loads."""
    for name, entry in index.items():
        if name.startswith("_") or entry is None or entry == [None, None]:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise UserError(f"{model_dir / 'model_index.json'}: entry '{name}' should be [library, class], got {entry}")
        folder = model_dir / name
        if not folder.is_dir():
            raise UserError(f"{folder} is missing: model_index.json names a {name}/ folder")
        if not str(entry[1]).endswith(WEIGHTLESS_CLASS_SUFFIXES):
            safetensors_files(folder)
