"""Measure what a generated picture shows, to check it against its prompt: the background colour,
the object's colour, where it sits, its shape class (bounding-box fill ratio), and motion in clips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgdiff.demo.scenes import COLOURS, POSITIONS

PALETTE = np.array(list(COLOURS.values()), dtype=float)  # [K, 3]
NAMES = list(COLOURS)
# Fill ratio of a shape's bounding box: circle pi/4, square 1, triangle 1/2.
FILL_RATIOS = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def nearest_colours(image: np.ndarray) -> np.ndarray:
    """[H, W] index into the palette of each pixel's nearest named colour."""
    distances = ((image[:, :, None, :].astype(float) - PALETTE[None, None]) ** 2).sum(-1)  # [H, W, K]
    return distances.argmin(-1)


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # the largest non-background colour, None if nothing stands out
    centre: tuple[float, float] | None  # (x, y) as fractions of the canvas
    fill_ratio: float | None

    def position(self) -> str | None:
        if self.centre is None:
            return None
        x, y = self.centre
        return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)

    def shape(self) -> str | None:
        fill = self.fill_ratio
        if fill is None:
            return None
        return min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill))


def read(image: np.ndarray, min_pixels: int = 12) -> Reading:
    """What a one-object picture shows. image: [H, W, 3] uint8."""
    labels = nearest_colours(image)
    counts = np.bincount(labels.ravel(), minlength=len(NAMES))
    background = int(counts.argmax())
    counts[background] = 0
    if counts.max() < min_pixels:
        return Reading(NAMES[background], None, None, None)
    colour = int(counts.argmax())
    ys, xs = np.nonzero(labels == colour)
    h, w = labels.shape
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return Reading(NAMES[background], NAMES[colour], (xs.mean() / w, ys.mean() / h), len(xs) / box)


def motion(frames: np.ndarray) -> str | None:
    """The direction the object's centroid travels from the first to the last frame."""
    first, last = read(frames[0]).centre, read(frames[-1]).centre
    if first is None or last is None:
        return None
    dx, dy = last[0] - first[0], last[1] - first[1]
    if max(abs(dx), abs(dy)) < 0.05:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"
