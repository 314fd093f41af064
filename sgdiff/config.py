"""Typed configuration: what to sample, where to run, and the presets that fill defaults.

Merge order, lowest to highest, always through `merge_layers`:
  sampling:  SAMPLING_DEFAULTS < preset [sampling] < flags given explicitly
  schedule:  FlowMatchSchedule() < preset [schedule] < the checkpoint's scheduler_config.json
A flag given explicitly wins even when it equals a default (flags arrive as None when not given).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sgdiff.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class SamplingParams:
    """One generation request: a prompt and how to sample it."""

    prompt: str
    negative_prompt: str | None = None
    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    seed: int = 42
    generator_device: str = "cpu"
    num_outputs_per_prompt: int = 1
    max_sequence_length: int = 512
    # video models only (None: the model's preset decides)
    num_frames: int | None = None
    num_frames_round_down: bool = False
    fps: int | None = None
    guidance_scale_2: float | None = None  # Wan2.2 MoE: CFG scale of the low-noise expert
    flow_shift: float | None = None
    image_path: str | None = None  # image-to-video: a local file or an http(s) URL
    # "default": the checkpoint's scheduler; "dmd": few-step DMD sampling at `dmd_timesteps` (FastWan)
    sampler: str = "default"
    dmd_timesteps: tuple[int, ...] | None = None

    def validate(self) -> None:
        check_sampling_values(self.__dict__)
        if not self.prompt.strip():
            raise UserError("the prompt is empty: pass --prompt TEXT (or a --prompt-file with non-empty lines)")


SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)} - {"prompt"}
SAMPLING_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SamplingParams) if f.name in SAMPLING_FIELDS}


INT_FIELDS = {
    "height", "width", "num_inference_steps", "seed", "num_outputs_per_prompt", "max_sequence_length", "num_frames",
    "fps",
}  # fmt: skip
FLOAT_FIELDS = {"guidance_scale", "true_cfg_scale", "guidance_scale_2", "flow_shift"}
STR_FIELDS = {"negative_prompt", "generator_device", "image_path", "sampler"}
INT_LIST_FIELDS = {"dmd_timesteps"}
BOOL_FIELDS = {"num_frames_round_down"}
MAX_SIZE = 8192
FLOAT32_MAX = 3.4028234663852886e38  # the scales become float32 tensors
MAX_SEED = 2**64 - 1
MAX_FRAMES = 1001  # ~1 minute at 16 fps; Wan is trained on 81 (121 for TI2V)
MAX_SEQUENCE_LENGTH = 512  # T5's length in FLUX's training; diffusers refuses more too


def check_sampling_types(values: Mapping[str, Any], source: str) -> None:
    """Values from presets and callers have the field's type (a flag parser already ensures it)."""
    for name, value in values.items():
        if value is None:
            continue
        ok = (
            (name in INT_FIELDS and isinstance(value, int) and not isinstance(value, bool))
            or (name in FLOAT_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (name in STR_FIELDS and isinstance(value, str))
            or (name in BOOL_FIELDS and isinstance(value, bool))
            or (
                name in INT_LIST_FIELDS
                and isinstance(value, (list, tuple))
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            )
        )
        if not ok:
            kinds = {
                **dict.fromkeys(INT_FIELDS, "an integer"),
                **dict.fromkeys(FLOAT_FIELDS, "a number"),
                **dict.fromkeys(BOOL_FIELDS, "true or false"),
                **dict.fromkeys(INT_LIST_FIELDS, "a list of integers"),
            }
            kind = kinds.get(name, "a string")
            raise UserError(f"{source}: {name} must be {kind}, got {value!r}")


def _valid_dmd_timesteps(steps) -> bool:
    decreasing = all(a > b for a, b in zip(steps, steps[1:], strict=False))
    return len(steps) >= 1 and all(0 < t <= 1000 for t in steps) and decreasing


def check_sampling_values(values: Mapping[str, Any]) -> None:
    """Checks that need no model; run on explicit flags before anything loads, and again after merging."""
    for name in sorted(FLOAT_FIELDS):
        value = values.get(name)
        if value is not None and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number (a 32-bit float), got {value}")
    for name in ("height", "width"):
        value = values.get(name)
        if value is not None and (value <= 0 or value % SIZE_MULTIPLE or value > MAX_SIZE):
            raise UserError(f"--{name} must be a positive multiple of {SIZE_MULTIPLE} up to {MAX_SIZE}, got {value}")
    checks = {
        "num_inference_steps": ("--num-inference-steps must be at least 1", lambda v: v >= 1),
        "num_outputs_per_prompt": ("--num-outputs-per-prompt must be at least 1", lambda v: v >= 1),
        "true_cfg_scale": ("--true-cfg-scale must be >= 1", lambda v: v >= 1),
        "max_sequence_length": (
            f"--max-sequence-length must be between 1 and {MAX_SEQUENCE_LENGTH}",
            lambda v: 1 <= v <= MAX_SEQUENCE_LENGTH,
        ),
        "seed": (f"--seed must be between 0 and {MAX_SEED}", lambda v: 0 <= v <= MAX_SEED),
        "num_frames": (f"--num-frames must be between 1 and {MAX_FRAMES}", lambda v: 1 <= v <= MAX_FRAMES),
        "fps": ("--fps must be between 1 and 240", lambda v: 1 <= v <= 240),
        "guidance_scale_2": ("--guidance-scale-2 must be >= 0", lambda v: v >= 0),
        "flow_shift": ("--flow-shift must be > 0", lambda v: v > 0),
        "generator_device": ("--generator-device must be 'cpu' or 'cuda'", lambda v: v in ("cpu", "cuda")),
        "sampler": ("sampler must be 'default' or 'dmd'", lambda v: v in ("default", "dmd")),
        "dmd_timesteps": ("dmd_timesteps must be decreasing, within 1..1000", _valid_dmd_timesteps),
    }
    for name, (message, ok) in checks.items():
        if values.get(name) is not None and not ok(values[name]):
            raise UserError(f"{message}, got {values[name]}")


@dataclass(frozen=True)
class SpeedConfig:
    """The speed toggles (sgdiff/speed/apply.py applies them, in one place)."""

    attention_backend: str = "auto"  # a name of speed/attention_backends.py
    fused_projections: bool = False  # Linears reading the same input as one GEMM
    fused_gelu: bool = False  # the MLPs' tanh GELU inside the GEMM that feeds it (cuBLASLt epilogue)
    fused_norms: bool = False  # q/k RMSNorm + RoPE, adaLN LayerNorm + modulation: Triton kernels (CUDA, bf16)
    torch_compile: bool = False  # regional: each repeated transformer block compiled once
    cuda_graph: bool = False  # the transformer's forward replayed as a CUDA graph


@dataclass(frozen=True)
class RuntimeConfig:
    """Where, in what precision and how fast the models run (None: chosen automatically)."""

    device: str | None = None
    dtype: str | None = None
    speed: SpeedConfig = SpeedConfig()


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes serve a request and how they split it (None: derived, as SGLang does).

    Ranks: cfg_degree x ring_degree x ulysses_degree = num_gpus; CFG parallel puts the prompt and
    negative branches on different ranks, sequence parallelism splits the latent tokens."""

    num_gpus: int = 1
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    enable_cfg_parallel: bool = False

    @property
    def cfg_degree(self) -> int:
        return 2 if self.enable_cfg_parallel else 1

    def resolved(self) -> ParallelConfig:
        """Defaults filled in and the combination checked: sequence degree = num_gpus / cfg degree,
        all Ulysses unless a ring degree is given."""
        n = self.num_gpus
        if n < 1:
            raise UserError(f"--num-gpus must be at least 1, got {n}")
        if n % self.cfg_degree:
            raise UserError(f"--enable-cfg-parallel needs an even --num-gpus, got {n}")
        sp = n // self.cfg_degree
        cfg = " / 2 (CFG parallel)" if self.enable_cfg_parallel else ""
        for name, value in (("--ulysses-degree", self.ulysses_degree), ("--ring-degree", self.ring_degree)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
            if value is not None and sp % value:
                raise UserError(f"{name} {value} must divide --num-gpus {n}{cfg} = {sp} sequence-parallel ranks")
        ring = self.ring_degree or (sp // self.ulysses_degree if self.ulysses_degree else 1)
        ulysses = self.ulysses_degree or sp // ring
        if ulysses * ring != sp:
            raise UserError(
                f"--ulysses-degree {ulysses} x --ring-degree {ring} = {ulysses * ring}, but --num-gpus {n}{cfg} "
                f"gives {sp} sequence-parallel ranks: make them multiply to --num-gpus{cfg}"
            )
        return ParallelConfig(n, ulysses, ring, self.enable_cfg_parallel)


@dataclass(frozen=True)
class EngineConfig:
    """What an engine loads and how it runs it: all a worker process needs to start."""

    model_path: str
    preset: str | None = None
    runtime: RuntimeConfig = RuntimeConfig()
    parallel: ParallelConfig = ParallelConfig()


@dataclass(frozen=True)
class Preset:
    name: str
    description: str = ""
    match: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)

    def matches_model_id(self, model_path: str) -> bool:
        ids = [m.lower() for m in self.match.get("model_ids", [])]
        return model_path.strip("/").lower() in ids

    def matches_config(
        self, pipeline_class: str, transformer_config: Mapping[str, Any], model_index: Mapping[str, Any]
    ) -> bool:
        if self.match.get("pipeline") != pipeline_class:
            return False
        wanted = [
            (transformer_config, self.match.get("transformer", {})),
            (model_index, self.match.get("model_index", {})),
        ]
        return all(config.get(k) == v for config, table in wanted for k, v in table.items())

    @property
    def specificity(self) -> int:
        """How many config values the preset's [match] names: the most specific matching preset wins."""
        return len(self.match.get("transformer", {})) + len(self.match.get("model_index", {}))


def merge_layers(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers win; a None value in a layer means 'not set' and never overrides."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in (layer or {}).items() if v is not None})
    return merged


def _parse_preset(text: str, source: str) -> Preset:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"preset {source} is not valid TOML: {exc}") from None
    unknown = set(raw.get("sampling", {})) - SAMPLING_FIELDS
    if unknown:
        raise UserError(f"preset {source}: unknown [sampling] keys {sorted(unknown)}")
    check_sampling_types(raw.get("sampling", {}), f"preset {source} [sampling]")
    return Preset(
        name=raw.get("name", Path(source).stem),
        description=raw.get("description", ""),
        match=raw.get("match", {}),
        sampling=raw.get("sampling", {}),
        schedule=raw.get("schedule", {}),
    )


def presets_dir() -> Path:
    """presets/ of a source checkout, or its copy inside an installed wheel (sgdiff/presets)."""
    installed = Path(__file__).parent / "presets"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "presets"


def builtin_presets() -> dict[str, Preset]:
    presets = {}
    for path in sorted(presets_dir().glob("*.toml")):
        preset = _parse_preset(path.read_text(), path.name)
        presets[preset.name] = preset
    return presets


def load_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or a .toml file."""
    presets = builtin_presets()
    if name_or_path in presets:
        return presets[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml":
        if not path.is_file():
            raise UserError(f"preset file {path} does not exist")
        return _parse_preset(path.read_text(), str(path))
    raise UserError(f"unknown preset '{name_or_path}': choose one of {', '.join(presets)} or give a .toml file")


def select_preset(
    explicit: str | None,
    model_path: str,
    pipeline_class: str,
    transformer_config: Mapping[str, Any],
    model_index: Mapping[str, Any] | None = None,
) -> Preset | None:
    """--preset wins; then a preset naming this model id; then the most specific one matching the
    checkpoint's config (its transformer config and model_index.json)."""
    if explicit:
        return load_preset(explicit)
    presets = list(builtin_presets().values())
    for preset in presets:
        if preset.matches_model_id(model_path):
            return preset
    matching = [p for p in presets if p.matches_config(pipeline_class, transformer_config, model_index or {})]
    return max(matching, key=lambda p: p.specificity, default=None)


def build_sampling_params(prompt: str, preset: Preset | None, flags: Mapping[str, Any]) -> SamplingParams:
    """The one place where defaults, the preset and explicit flags meet."""
    unknown = set(flags) - SAMPLING_FIELDS
    if unknown:
        raise UserError(f"unknown sampling parameters {sorted(unknown)}; known: {sorted(SAMPLING_FIELDS)}")
    check_sampling_types(flags, "sampling parameters")
    values = merge_layers(SAMPLING_DEFAULTS, preset.sampling if preset else None, flags)
    if values.get("dmd_timesteps") is not None:
        values["dmd_timesteps"] = tuple(values["dmd_timesteps"])
    params = SamplingParams(prompt=prompt, **{k: v for k, v in values.items() if k in SAMPLING_FIELDS})
    params.validate()
    return params
