"""Grade a demo model on the held-out prompts: generate each one and check the pixels against it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgdiff.demo.checks import motion, read
from sgdiff.demo.scenes import Scene, evaluation_scenes, spread

PASS_RATE = 0.9  # each check must be right this often


@dataclass
class Grades:
    """Share of cases each check got right, and the captions it got wrong."""

    rates: dict[str, float]
    misses: dict[str, list[str]] = field(default_factory=dict)

    def passed(self) -> bool:
        return all(rate >= PASS_RATE for rate in self.rates.values())

    def summary(self) -> str:
        return ", ".join(f"{name} {rate:.0%}" for name, rate in self.rates.items())


def _grade(answers: dict[str, list[tuple[bool, str]]]) -> Grades:
    rates = {name: sum(ok for ok, _ in results) / len(results) for name, results in answers.items()}
    misses = {name: [caption for ok, caption in results if not ok] for name, results in answers.items()}
    return Grades(rates, {name: m for name, m in misses.items() if m})


def grade_images(scenes: list[Scene], images: list[np.ndarray]) -> Grades:
    """images: [H, W, 3] uint8, one per one-object scene."""
    answers: dict[str, list[tuple[bool, str]]] = {"background": [], "colour": [], "position": [], "shape": []}
    for scene, image in zip(scenes, images, strict=True):
        reading, obj, caption = read(image), scene.objects[0], scene.caption()
        answers["background"].append((reading.background == scene.background, caption))
        answers["colour"].append((reading.colour == obj.colour, caption))
        answers["position"].append((reading.position() == obj.position, caption))
        answers["shape"].append((reading.shape() == obj.kind, caption))
    return _grade(answers)


def grade_clips(scenes: list[Scene], videos: list[np.ndarray]) -> Grades:
    """videos: [T, H, W, 3] uint8, one per clip scene; colours are read on the middle frame."""
    answers: dict[str, list[tuple[bool, str]]] = {"background": [], "colour": [], "motion": []}
    for scene, frames in zip(scenes, videos, strict=True):
        reading, caption = read(frames[len(frames) // 2]), scene.caption()
        answers["background"].append((reading.background == scene.background, caption))
        answers["colour"].append((reading.colour == scene.objects[0].colour, caption))
        answers["motion"].append((motion(frames) == scene.motion, caption))
    return _grade(answers)


def grade_model(engine, clip: bool, seed: int = 0, prompts: int | None = None, **flags: Any) -> Grades:
    """Generate every held-out prompt (or `prompts` of them, spread over the set) with `engine` (an sgdiff
    ModelRunner) at its preset (`flags`, e.g. num_inference_steps, override it), and grade."""
    scenes = spread(evaluation_scenes(clip), prompts)
    outputs = []
    for index, scene in enumerate(scenes):
        result = engine.generate(engine.sampling_params(scene.caption(), seed=seed + index, **flags))
        outputs.append(result.videos[0] if clip else result.images[0])
    return grade_clips(scenes, outputs) if clip else grade_images(scenes, outputs)
