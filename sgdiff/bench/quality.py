"""`sgdiff bench --quality`: each lossy mode (a step cache, FP8 weights, both) on the embedded demo models,
whose trained weights make the numbers mean something, against the lossless output for the same held-out
prompts and seeds: PSNR and the largest pixel difference, the demo checks' pass rates (sgdiff/demo/quality.py:
each must stay >= 90%), the forwards a cache skipped, and the time per output.

On a device without FP8 matmuls (a CPU) the FP8 rows quantise the weights as on a GPU and run the matmuls
emulated in float32 (models/fp8.py scaled_mm_emulated): the quality is the quantisation's, the time is not
a GPU's."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sgdiff.config import CACHE_METHODS, RuntimeConfig, SpeedConfig
from sgdiff.errors import UserError

DEMOS = (("sgdiff/demo-image", False), ("sgdiff/demo-video", True))


@dataclass(frozen=True)
class Mode:
    name: str
    speed: SpeedConfig  # the cache options (threshold/warm-up None: the method's defaults)
    fp8: bool = False


def lossy_modes(base: SpeedConfig, cache: str | None, fp8: bool) -> list[Mode]:
    """Every step cache alone (its defaults), FP8 alone and each cache with FP8; or, when `cache` or `fp8` is
    given, only that mode (`base`'s cache options). Each on top of `base`'s other toggles."""
    plain = replace(base, cache="none", cache_threshold=None, cache_warmup_steps=None, cache_interval=None,
                    dit_precision="default")  # fmt: skip
    if cache is not None or fp8:
        return [Mode(mode_name(cache or "none", fp8), replace(base, dit_precision="default"), fp8)]
    caches = [Mode(method, replace(plain, cache=method)) for method in CACHE_METHODS]
    return caches + [Mode("fp8", plain, True)] + [replace(m, name=mode_name(m.name, True), fp8=True) for m in caches]


def mode_name(cache: str, fp8: bool) -> str:
    return " + ".join(part for part in (cache if cache != "none" else "", "fp8" if fp8 else "") if part)


def psnr(outputs: list[np.ndarray], references: list[np.ndarray]) -> list[float]:
    """Per output (an image or a whole clip), in dB over 0..255; inf where identical."""
    values = []
    for out, ref in zip(outputs, references, strict=True):
        mse = float(np.mean((out.astype(np.float64) - ref.astype(np.float64)) ** 2))
        values.append(math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
    return values


def run_quality(modes: list[Mode], prompts: int | None, warmup: int = 1, device: str = "auto",
                spell: Callable[[str], str] = lambda field: field) -> list[dict[str, Any]]:  # fmt: skip
    """One row per demo model and mode (the lossless reference first: `modes`' toggles without the lossy
    ones), generated on `device` after `warmup` untimed outputs; a mode a model lacks is a row saying why
    (its fields spelled by `spell`, e.g. as the CLI's flags)."""
    from sgdiff.demo.quality import grade_clips, grade_images
    from sgdiff.demo.scenes import evaluation_scenes, spread

    rows = []
    for name, clip in DEMOS:
        scenes = spread(evaluation_scenes(clip), prompts)
        grade = grade_clips if clip else grade_images
        lossless = Mode("lossless", replace(modes[0].speed, cache="none", cache_threshold=None, cache_warmup_steps=None,
                                            cache_interval=None))  # fmt: skip
        reference, seconds, _ = generate_all(name, clip, scenes, lossless, warmup, device)
        grades = grade(scenes, reference)
        rows.append({"model": name, "mode": "lossless", "outputs": len(scenes), "psnr_mean_db": None,
                     "psnr_min_db": None, "max_diff": 0, "checks": grades.rates, "checks_passed": grades.passed(),
                     "seconds_per_output": seconds, "speedup": 1.0, "skipped": None})  # fmt: skip
        for mode in modes:
            try:
                outputs, mode_seconds, skipped = generate_all(name, clip, scenes, mode, warmup, device)
            except UserError as error:  # a method this model's family does not offer
                rows.append({"model": name, "mode": mode.name, "unavailable": error.render(spell)})
                continue
            values, grades = psnr(outputs, reference), grade(scenes, outputs)
            rows.append({
                "model": name, "mode": mode.name, "outputs": len(scenes),
                "psnr_mean_db": finite_or_none(float(np.mean(values))), "psnr_min_db": finite_or_none(min(values)),
                "max_diff": max_difference(outputs, reference),
                "checks": grades.rates, "checks_passed": grades.passed(), "seconds_per_output": mode_seconds,
                "speedup": seconds / mode_seconds, "skipped": skipped,
            })  # fmt: skip
    return rows


def finite_or_none(db: float) -> float | None:
    """None: identical outputs (an infinite PSNR, which JSON cannot hold)."""
    return None if math.isinf(db) else db


def max_difference(outputs: list[np.ndarray], references: list[np.ndarray]) -> int:
    return max(int(np.abs(o.astype(int) - r.astype(int)).max()) for o, r in zip(outputs, references, strict=True))


def generate_all(name: str, clip: bool, scenes, mode: Mode, warmup: int,
                 device: str) -> tuple[list[np.ndarray], float, Any]:  # fmt: skip
    """Every scene's output (seed = its index, as the demo checks use), the seconds per output after `warmup`
    untimed ones, and what the step cache computed and skipped (None without a cache)."""
    import torch

    from sgdiff.engine.runner import ModelRunner
    from sgdiff.speed.fp8 import use_fp8_weights
    from sgdiff.speed.step_cache import step_cache_of

    emulate_fp8 = mode.fp8 and not fp8_matmuls_on(device)
    speed = replace(mode.speed, dit_precision="fp8" if mode.fp8 and not emulate_fp8 else "default")
    engine = ModelRunner(name, runtime=RuntimeConfig(device=None if device == "auto" else device, speed=speed))
    engine.load()
    assert engine.pipeline is not None  # (loaded)
    (transformer,) = engine.pipeline.transformers
    if emulate_fp8:
        use_fp8_weights(transformer)
    generate = engine.generate
    for _ in range(warmup):  # (kernels, the allocator, compiling)
        generate(engine.sampling_params(scenes[0].caption(), seed=0))
    cache = step_cache_of(transformer)
    before = dict(cache.report()) if cache is not None else None
    outputs = []
    began = time.perf_counter()
    for index, scene in enumerate(scenes):
        result = generate(engine.sampling_params(scene.caption(), seed=index))
        decoded = result.videos if clip else result.images
        assert decoded is not None  # (the demo models' outputs are decoded)
        outputs.append(decoded[0])
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / len(scenes)
    skipped = None
    if cache is not None and before is not None:
        after = cache.report()
        skipped = {"computed": after["computed_forwards"] - before["computed_forwards"],
                   "skipped": after["skipped_forwards"] - before["skipped_forwards"]}  # fmt: skip
    return outputs, seconds, skipped


def fp8_matmuls_on(device: str) -> bool:
    """Whether `--dit-precision fp8` runs here (speed/fp8.py check_fp8, in the dtype the device loads in)."""
    from sgdiff.engine.runner import resolve_device, resolve_dtype
    from sgdiff.speed.fp8 import check_fp8

    resolved = resolve_device(None if device == "auto" else device)
    try:
        check_fp8(resolved, resolve_dtype(None, resolved))
    except UserError:
        return False
    return True


def render_quality(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| demo model | mode | PSNR mean / min (dB) | max diff (/255) | checks (>= 90% each) | forwards skipped "
        "| s per output | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "unavailable" in row:
            lines.append(f"| {row['model']} | {row['mode']} | not available: {row['unavailable']} | | | | | |")
            continue
        checks = ", ".join(f"{name} {rate:.0%}" for name, rate in row["checks"].items())
        checks += "" if row["checks_passed"] else " (FAILS)"
        skipped = row["skipped"]
        share = "-" if skipped is None else f"{skipped['skipped']} of {skipped['skipped'] + skipped['computed']}"
        mean, low = (("identical" if db is None else f"{db:.1f}") for db in (row["psnr_mean_db"], row["psnr_min_db"]))
        lines.append(
            f"| {row['model']} | {row['mode']} | {mean} / {low} | "
            f"{row['max_diff']} | {checks} | {share} | {row['seconds_per_output']:.3f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines)
