"""Which pipeline serves a checkpoint, by model_index.json's `_class_name`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgdiff.config import SamplingParams
from sgdiff.errors import UserError
from sgdiff.models.loading import read_json, safetensors_files
from sgdiff.pipeline.base import ComposedPipeline
from sgdiff.pipeline.flux import flux_rules, load_flux_pipeline, true_cfg_scale_of
from sgdiff.pipeline.schedule import FlowMatchSchedule
from sgdiff.pipeline.stages.validation import ValidationRule
from sgdiff.pipeline.wan import (
    WanSchedule,
    guidance_cfg,
    load_wan_pipeline,
    wan_adjust,
    wan_given_flag_rules,
    wan_rules,
)

COMMON_FIELDS = frozenset(
    {"negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "seed", "generator_device",
     "num_outputs_per_prompt", "max_sequence_length"}
)  # fmt: skip
VIDEO_FIELDS = frozenset({"num_frames", "num_frames_round_down", "fps", "flow_shift", "guidance_scale_2", "image_path"})


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
    def spec(self) -> PipelineSpec:
        return PIPELINES[self.pipeline_class]


@dataclass(frozen=True)
class PipelineSpec:
    """How to build one pipeline family."""

    # load(model_dir, device, dtype, schedule, events, skip) -> ComposedPipeline
    load: Callable[..., ComposedPipeline]
    # rules(info) -> request checks, run before any weight loads (and again by the validation stage)
    rules: Callable[[ModelInfo], list[ValidationRule]]
    # schedule(merged scheduler options) -> the pipeline's schedule object; refuses what it cannot honour
    schedule: Callable[[dict[str, Any]], Any]
    output: str  # "image" or "video"
    accepts: frozenset[str]  # the sampling parameters this pipeline uses; a flag outside them is refused
    adjust: Callable[[SamplingParams], SamplingParams] = lambda params: params
    # given_flag_rules(names of the flags given explicitly, params): refuse flags this request would ignore
    given_flag_rules: Callable[[set[str], SamplingParams], None] = lambda given, params: None
    # the request's CFG scale, or None when it runs without CFG (then CFG parallel has nothing to split)
    cfg_scale_of: Callable[[SamplingParams], float | None] = lambda params: None
    # components only the text encoding stage uses (ranks other than 0 do not load them)
    text_encoders: frozenset[str] = frozenset({"text_encoder"})


WAN_SPEC = PipelineSpec(
    load=load_wan_pipeline,
    rules=lambda info: wan_rules(
        info.transformer_config,
        info.model_index,
        info.vae_config,
        ((info.model_dir / "transformer").is_dir(), (info.model_dir / "transformer_2").is_dir()),
    ),  # fmt: skip
    schedule=WanSchedule.from_dict,
    output="video",
    accepts=COMMON_FIELDS | VIDEO_FIELDS,
    adjust=wan_adjust,
    given_flag_rules=wan_given_flag_rules,
    cfg_scale_of=guidance_cfg,
)

PIPELINES: dict[str, PipelineSpec] = {
    "FluxPipeline": PipelineSpec(
        load=load_flux_pipeline,
        rules=lambda info: flux_rules(info.transformer_config),
        schedule=FlowMatchSchedule.from_dict,
        output="image",
        accepts=COMMON_FIELDS | {"true_cfg_scale"},
        cfg_scale_of=true_cfg_scale_of,
        text_encoders=frozenset({"text_encoder", "text_encoder_2"}),
    ),
    "WanPipeline": WAN_SPEC,
    "WanImageToVideoPipeline": WAN_SPEC,  # one pipeline: the checkpoint's parts decide what it does
}


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


WEIGHTLESS_CLASS_SUFFIXES = ("Tokenizer", "TokenizerFast", "Scheduler", "Processor", "FeatureExtractor")


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
