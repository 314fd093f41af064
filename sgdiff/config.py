"""Typed configuration: where and how fast to run, and the presets that fill defaults (what to
sample is sgdiff/sampling.py).

Merge order, lowest to highest, always through `merge_layers`:
  sampling:  the family's SamplingParams defaults < preset [sampling] < values given explicitly
  schedule:  the family's schedule defaults < preset [schedule] < the checkpoint's scheduler_config.json
A value given explicitly wins even when it equals a default (flags arrive as None when not given).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sgdiff.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class SpeedConfig:
    """The speed toggles (sgdiff/speed/apply.py applies them, in one place). The fusions left at None are
    decided for the device (speed/apply.py resolve_speed): on where they run and are faster, a CUDA GPU
    in bfloat16; True insists (an error where one cannot run), False turns one off."""

    attention_backend: str = "auto"  # a name of speed/attention_backends.py
    fused_projections: bool | None = None  # Linears reading the same input as one GEMM
    fused_gelu: bool | None = None  # the MLPs' tanh GELU inside the GEMM that feeds it (cuBLASLt epilogue)
    fused_norms: bool | None = None  # q/k RMSNorm + RoPE, adaLN LayerNorm + modulation: Triton kernels (CUDA, bf16)
    torch_compile: bool = False  # regional: each repeated transformer block compiled once
    cuda_graph: bool = False  # the transformer's forward replayed as a CUDA graph
    dit_precision: str = "default"  # "fp8": the blocks' Linear weights in float8, FP8 matmuls (speed/fp8.py)
    # step caching (speed/step_cache/): "none" (lossless, the default) or one of CACHE_METHODS; the threshold
    # (fbcache, teacache, magcache), the interval (taylorseer) and the warm-up steps left at None take the
    # method's default (speed/apply.py resolve_speed; magcache's warm-up stays None: 20% of each request's steps)
    cache: str = "none"
    cache_threshold: float | None = None
    cache_warmup_steps: int | None = None
    cache_interval: int | None = None
    # "ahead": each block kind compiled by AOTInductor into a program kept on disk, which later processes load
    # without the compiler (speed/precompile.py); "just-in-time": torch.compile at the first call
    torch_compile_mode: str = "ahead"

    def __post_init__(self):
        check_cache(self)
        if self.torch_compile_mode not in COMPILE_MODES:
            mode, modes = self.torch_compile_mode, ", ".join(COMPILE_MODES)
            raise UserError(f"`torch_compile_mode` {mode!r} is not one of {modes}", field="torch_compile_mode")


COMPILE_MODES = ("ahead", "just-in-time")
CACHE_METHODS = ("fbcache", "teacache", "magcache", "taylorseer")
# `cache` recommended: the model's preset's [cache] table (`with_recommended_cache`), resolved once the preset is known
RECOMMENDED_CACHE = "recommended"
# a preset's [cache] keys -> SpeedConfig's fields
PRESET_CACHE_KEYS = {"method": "cache", "threshold": "cache_threshold", "warmup_steps": "cache_warmup_steps",
                     "interval": "cache_interval"}  # fmt: skip


def check_cache(speed: SpeedConfig) -> None:
    if speed.cache == RECOMMENDED_CACHE:
        tuned = [name for name in list(PRESET_CACHE_KEYS.values())[1:] if getattr(speed, name) is not None]
        if tuned:
            raise UserError(f"`cache` recommended takes the whole of the model's preset's setting, `{tuned[0]}` "
                            "included: to tune it, give the method by name", field=tuned[0])  # fmt: skip
        if speed.cuda_graph:
            raise UserError(CACHE_AND_GRAPH, field="cache")
        return
    if speed.cache != "none" and speed.cache not in CACHE_METHODS:
        raise UserError(f"`cache` {speed.cache!r} is not one of none, {RECOMMENDED_CACHE}, {', '.join(CACHE_METHODS)}",
                        field="cache")  # fmt: skip
    for name in ("cache_threshold", "cache_warmup_steps"):
        if getattr(speed, name) is not None and speed.cache == "none":
            raise UserError(f"`{name}` tunes a step cache: give `cache` too (one of {', '.join(CACHE_METHODS)})",
                            field=name)  # fmt: skip
    threshold, warmup, interval = speed.cache_threshold, speed.cache_warmup_steps, speed.cache_interval
    if interval is not None and speed.cache != "taylorseer":
        raise UserError("`cache_interval` sets taylorseer's schedule: give `cache` taylorseer or drop it",
                        field="cache_interval")  # fmt: skip
    if threshold is not None and speed.cache == "taylorseer":  # (a schedule: no change is measured)
        raise UserError("`cache_threshold` has no meaning for taylorseer, which follows a schedule: "
                        "set `cache_interval` instead", field="cache_threshold")  # fmt: skip
    if threshold is not None and (isinstance(threshold, bool) or not 0 <= threshold < float("inf")):
        raise UserError(f"`cache_threshold` must be a finite number >= 0, got {threshold!r}", field="cache_threshold")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1):
        raise UserError(
            f"`cache_warmup_steps` must be an integer >= 1 (the first step is always computed), got {warmup!r}",
            field="cache_warmup_steps",
        )
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise UserError(f"`cache_interval` must be an integer >= 1 (1 computes every step), got {interval!r}",
                        field="cache_interval")  # fmt: skip
    if speed.cache != "none" and speed.cuda_graph:
        raise UserError(CACHE_AND_GRAPH, field="cache")


CACHE_AND_GRAPH = ("`cache` decides on the host, between the transformer's blocks, whether to run them, and "
                   "`cuda_graph` replays the whole forward as one graph: drop one of them")  # fmt: skip


def with_recommended_cache(speed: SpeedConfig, preset: Preset | None) -> SpeedConfig:
    """`speed` with `cache` recommended made the model's preset's [cache] setting; other caches as they are."""
    if speed.cache != RECOMMENDED_CACHE:
        return speed
    if preset is None or not preset.cache:
        whose = f"the preset {preset.name}" if preset is not None else "this model (it has no preset)"
        raise UserError(f"`cache` recommended: {whose} recommends no step cache (none measured on it yet): give "
                        f"one of {', '.join(CACHE_METHODS)} by name, or leave `cache` out", field="cache")  # fmt: skip
    return replace(speed, **preset_cache_fields(preset.cache, preset.name))


def preset_cache_fields(table: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A preset's [cache] table as SpeedConfig fields, checked as `--cache` and its flags are."""
    unknown = [key for key in table if key not in PRESET_CACHE_KEYS]
    if unknown:
        raise UserError(f"preset {name}: [cache] has no key {unknown[0]!r} (it takes {', '.join(PRESET_CACHE_KEYS)})")
    if table.get("method") not in CACHE_METHODS:
        raise UserError(f"preset {name}: [cache] method must be one of {', '.join(CACHE_METHODS)}, "
                        f"not {table.get('method')!r}")  # fmt: skip
    fields = {PRESET_CACHE_KEYS[key]: value for key, value in table.items()}
    try:
        SpeedConfig(**fields)
    except UserError as exc:  # (spelt with the table's keys: `cache_threshold` is its threshold)
        keys = {field: key for key, field in PRESET_CACHE_KEYS.items()}
        raise UserError(f"preset {name}: [cache] {exc.render(lambda field: keys.get(field, field))}") from None
    return fields


OFFLOAD_MODES = ("none", "components", "layers")


@dataclass(frozen=True)
class OffloadConfig:
    """What lives in CPU memory and is lent to the GPU only while it runs (sgdiff/offload/apply.py applies
    it, in one place). Every mode is lossless: the outputs are those of the run with everything on the GPU.

    cpu_offload: none; components (the text encoders, image encoder and VAE while they run; of several
    transformers, Wan2.2 A14B's experts, the one running); layers (components, and every transformer's
    repeated blocks copied in one by one while the blocks before them compute, `offload_prefetch` ahead)."""

    cpu_offload: str = "none"  # one of OFFLOAD_MODES
    text_encoder_offload: bool = False  # the text encoders leave the GPU once the prompt is encoded
    offload_prefetch: int = 1  # layers: blocks copied ahead of the one that runs
    # layers: blocks that stay on the device while a stage runs them (offload/resident.py): a count, or "auto"
    # (as many as fit beside a forward's memory; 0 on a CPU, where nothing streams to save)
    offload_resident_blocks: int | str = "auto"

    def __post_init__(self):
        if self.cpu_offload not in OFFLOAD_MODES:
            raise UserError(
                f"`cpu_offload` {self.cpu_offload!r} is not one of {', '.join(OFFLOAD_MODES)}", field="cpu_offload"
            )
        depth = self.offload_prefetch
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise UserError(f"`offload_prefetch` must be an integer >= 0, got {depth!r}", field="offload_prefetch")
        kept = self.offload_resident_blocks
        if kept != "auto" and (isinstance(kept, bool) or not isinstance(kept, int) or kept < 0):
            raise UserError(f"`offload_resident_blocks` must be auto or an integer >= 0, got {kept!r}",
                            field="offload_resident_blocks")  # fmt: skip

    @property
    def resident_count(self) -> int | None:
        """The blocks `layers` keeps on the device: a count, or None for auto."""
        kept = self.offload_resident_blocks
        return None if kept == "auto" else int(kept)

    @property
    def offloads(self) -> bool:
        return self.cpu_offload != "none" or self.text_encoder_offload


LORA_MODES = ("auto", "fused", "unfused")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the transformer (sgdiff/lora/; engine/adapters.py reads them when the runner is made and
    ModelRunner.load applies them). Wan2.2 A14B: `transformer` only (the high-noise expert), as diffusers'
    load_lora_weights does by default.

    mode: fused (the updates added into the weights: nothing per step), unfused (kept beside the Linears: a
    little work per step), or auto: fused, but unfused for a server whose transformer's weights do not stay in
    place (`resolved`). switching (a server's, `resolved(switching=True, ...)`): each request picks the
    adapters and scales it runs with; fused adapters are then fused anew from a copy of the base weights
    whenever a request changes them (lora/fused.py), where the weights stay in place, and else stay fixed.
    Without switching, fused adapters are fixed for the engine's life and no copy is kept."""

    adapters: tuple[tuple[str, float], ...] = ()  # (a .safetensors file, a folder with one or a Hub repo id, scale)
    mode: str = "auto"
    switching: bool = False

    def __post_init__(self):
        if self.mode not in LORA_MODES:
            raise UserError(f"`lora_mode` {self.mode!r} is not one of {', '.join(LORA_MODES)}", field="lora_mode")
        if self.mode != "auto" and not self.adapters:
            raise UserError(f"`lora_mode` {self.mode} says how LoRA adapters are applied: give `lora_path` too",
                            field="lora_mode")  # fmt: skip
        for source, scale in self.adapters:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise UserError(f"`lora_path` {source}: its scale must be a finite number, got {scale!r}",
                                field="lora_path")  # fmt: skip

    def resolved(self, switching: bool, in_place: bool) -> LoraConfig:
        """`auto` made fused or unfused, and whether requests switch adapters: where they would (a server),
        unfused unless the transformer's weights stay `in_place` (a fused switch writes them where they are:
        not with `cpu_offload`, which moves them, nor under sequence parallelism, whose Ulysses keeps copies of
        their q/k/v rows), and fused adapters switch only where they do."""
        if not self.adapters:
            return self
        mode = self.mode if self.mode != "auto" else "unfused" if switching and not in_place else "fused"
        return LoraConfig(self.adapters, mode, switching and (mode == "unfused" or in_place))


@dataclass(frozen=True)
class RuntimeConfig:
    """Where, in what precision and how fast the models run (None: chosen automatically)."""

    device: str | None = None
    dtype: str | None = None
    speed: SpeedConfig = SpeedConfig()
    # every VAE decodes in tiles and a batch one item at a time (pipeline/vae_tiling.py); on several
    # processes the tiles are shared out over the ranks (parallel/vae.py)
    vae_tiling: bool = False
    offload: OffloadConfig = OffloadConfig()  # what waits in CPU memory while it does not run
    # bytes of its CUDA GPU each process may allocate (None: all of it): engine/memory.py cap_gpu_memory
    gpu_memory_limit: int | None = None
    lora: LoraConfig = LoraConfig()  # LoRA adapters on the transformer


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
            raise UserError(f"`num_gpus` must be at least 1, got {n}", field="num_gpus")
        if n % self.cfg_degree:
            raise UserError(f"`enable_cfg_parallel` needs an even `num_gpus`, got {n}", field="num_gpus")
        sp = n // self.cfg_degree
        cfg = " / 2 (CFG parallel)" if self.enable_cfg_parallel else ""
        for name, value in (("ulysses_degree", self.ulysses_degree), ("ring_degree", self.ring_degree)):
            if value is not None and value < 1:
                raise UserError(f"`{name}` must be at least 1, got {value}", field=name)
            if value is not None and sp % value:
                raise UserError(
                    f"`{name}` {value} must divide `num_gpus` {n}{cfg} = {sp} sequence-parallel ranks", field=name
                )
        ring = self.ring_degree or (sp // self.ulysses_degree if self.ulysses_degree else 1)
        ulysses = self.ulysses_degree or sp // ring
        if ulysses * ring != sp:
            raise UserError(
                f"`ulysses_degree` {ulysses} x `ring_degree` {ring} = {ulysses * ring}, but `num_gpus` {n}{cfg} "
                f"gives {sp} sequence-parallel ranks: make them multiply to `num_gpus`{cfg}",
                field="ulysses_degree",
            )
        return ParallelConfig(n, ulysses, ring, self.enable_cfg_parallel)


def switching_loras(runtime: RuntimeConfig, parallel: ParallelConfig) -> RuntimeConfig:
    """`runtime` with its LoRA adapters picked per request (a server's): LoraConfig.resolved, the weights in place
    unless CPU offload moves them or sequence parallelism copies them."""
    ranks = parallel.resolved()
    in_place = runtime.offload.cpu_offload == "none" and ranks.num_gpus == ranks.cfg_degree
    return replace(runtime, lora=runtime.lora.resolved(switching=True, in_place=in_place))


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic request batching: requests that can share a forward pass (the model family says which)
    and arrive within `delay_ms` of the oldest waiting one run as one batch of up to `max_batch_size`.
    max_batch_size 1: every request runs alone."""

    max_batch_size: int = 1
    delay_ms: float = 0.0

    def __post_init__(self):
        size, delay = self.max_batch_size, self.delay_ms
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UserError(f"`max_batch_size` must be an integer of at least 1, got {size!r}", field="max_batch_size")
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < float("inf"):
            raise UserError(
                f"`batching_delay_ms` must be a finite number of milliseconds >= 0, got {delay!r}",
                field="batching_delay_ms",
            )


@dataclass(frozen=True)
class EngineConfig:
    """What an engine loads and how it runs it: all a worker process needs to start."""

    model_path: str
    preset: str | None = None
    runtime: RuntimeConfig = RuntimeConfig()
    parallel: ParallelConfig = ParallelConfig()
    batching: BatchingConfig = BatchingConfig()
    revision: str | None = None  # of a Hub repo id: a branch, tag or commit hash (None: its main)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str = ""
    match: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    # the step cache `cache` recommended runs (PRESET_CACHE_KEYS: method, threshold, ...); {}: none recommended
    cache: dict[str, Any] = field(default_factory=dict)

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
    for table in ("match", "sampling", "schedule", "cache"):
        if not isinstance(raw.get(table, {}), dict):
            raise UserError(f"preset {source}: [{table}] must be a table")
    if raw.get("cache"):
        preset_cache_fields(raw["cache"], source)
    return Preset(
        name=raw.get("name", Path(source).stem),
        description=raw.get("description", ""),
        match=raw.get("match", {}),
        sampling=raw.get("sampling", {}),
        schedule=raw.get("schedule", {}),
        cache=raw.get("cache", {}),
    )


def presets_dir() -> Path:
    """presets/ of a source checkout, or its copy inside an installed wheel (sgdiff/presets)."""
    installed = Path(__file__).parent / "presets"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "presets"


def builtin_presets() -> dict[str, Preset]:
    presets = {}
    for path in sorted(presets_dir().glob("*.toml")):
        preset = _parse_preset(path.read_text(encoding="utf-8"), path.name)
        presets[preset.name] = preset
    return presets


def load_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or a .toml file."""
    presets = builtin_presets()
    if name_or_path in presets:
        return presets[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml":
        return read_preset_file(path)
    raise UserError(f"unknown preset '{name_or_path}': choose one of {', '.join(presets)} or give a .toml file")


def read_preset_file(path: Path) -> Preset:
    if path.is_dir():
        raise UserError(f"preset {path} is a folder: give a .toml file")
    if not path.is_file():
        raise UserError(f"preset file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"preset {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"preset {path} cannot be read ({exc.strerror})") from None
    return _parse_preset(text, str(path))


def select_preset(
    explicit: str | None,
    model_path: str,
    pipeline_class: str,
    transformer_config: Mapping[str, Any],
    model_index: Mapping[str, Any] | None = None,
) -> Preset | None:
    """The model's own preset: one naming this model id, else the most specific one matching the
    checkpoint's config (its transformer config and model_index.json). --preset, when given, wins: a
    built-in one stands alone, a .toml file builds on the model's own preset (its values over it). A
    preset made for another pipeline is refused."""
    presets = builtin_presets()
    own = next((p for p in presets.values() if p.matches_model_id(model_path)), None)
    if own is None:
        matching = [
            p for p in presets.values() if p.matches_config(pipeline_class, transformer_config, model_index or {})
        ]
        own = max(matching, key=lambda p: p.specificity, default=None)
    if not explicit:
        return own
    chosen = load_preset(explicit)
    meant_for = chosen.match.get("pipeline")
    if meant_for is not None and meant_for != pipeline_class:
        fitting = [name for name, p in presets.items() if p.match.get("pipeline") == pipeline_class]
        raise UserError(
            f"preset {chosen.name} is for {meant_for} models, and this checkpoint is a {pipeline_class}: "
            f"{'choose ' + ', '.join(fitting) if fitting else 'leave --preset out'}",
            field="preset",
        )
    if explicit in presets or own is None:
        return chosen
    return Preset(
        name=chosen.name,
        description=chosen.description or own.description,
        match=chosen.match or own.match,
        sampling=merge_layers(own.sampling, chosen.sampling),
        schedule=merge_layers(own.schedule, chosen.schedule),
        cache=chosen.cache or own.cache,  # (a whole setting: one method's threshold means nothing to another)
    )
