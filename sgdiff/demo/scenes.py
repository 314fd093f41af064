"""Synthetic captioned scenes for the demo models: simple shapes in plain colours, and clips where
one object moves. Everything is made in code from a seed; nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {  # centre as (x, y), fractions of the canvas
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
SIZES = {"small": 0.16, "large": 0.28}  # half-extent, fraction of the canvas
MOTIONS: dict[str, tuple[float, float]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str
    size: str = "large"

    def phrase(self) -> str:
        where = "in the centre" if self.position == "centre" else f"at the {self.position}"
        if self.position in ("left", "right"):
            where = f"on the {self.position}"
        return f"a {self.size} {self.colour} {self.kind} {where}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Shape, ...]
    motion: str | None = None  # clips: the direction the (single) object moves

    def caption(self) -> str:
        if self.motion is not None:
            shape = self.objects[0]
            return f"a {shape.size} {shape.colour} {shape.kind} moving {self.motion} on a {self.background} background"
        things = " and ".join(o.phrase() for o in self.objects)
        return f"{things} on a {self.background} background"


def sample_scene(rng: np.random.Generator, two_objects_rate: float = 0.25) -> Scene:
    background = str(rng.choice(list(COLOURS)))
    count = 2 if rng.random() < two_objects_rate else 1
    positions = rng.choice(list(POSITIONS), size=count, replace=False)
    colours = [c for c in COLOURS if c != background]
    objects = tuple(
        Shape(
            str(rng.choice(SHAPES)),
            str(rng.choice(colours)),
            str(p),
            "small" if count == 2 else str(rng.choice(list(SIZES))),
        )
        for p in positions
    )
    return Scene(background, objects)


def sample_clip_scene(rng: np.random.Generator) -> Scene:
    scene = sample_scene(rng, two_objects_rate=0.0)
    shape = replace(scene.objects[0], position="centre", size="small")
    return Scene(scene.background, (shape,), motion=str(rng.choice(list(MOTIONS))))


def shape_mask(kind: str, centre: tuple[float, float], half: float, size: int) -> np.ndarray:
    """[size, size] bool mask of a shape centred at `centre` (pixels) with half-extent `half`."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - centre[0], y - centre[1]
    if kind == "circle":
        return dx**2 + dy**2 <= half**2
    if kind == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # triangle pointing up: inside the base line and both slanted sides
    return (dy <= half) & (dy >= -half) & (np.abs(dx) <= (dy + half) / 2)


def render(scene: Scene, size: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """[size, size, 3] uint8. `offset` (fractions of the canvas) shifts every object (clips)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = COLOURS[scene.background]
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        centre = ((fx + offset[0]) * size, (fy + offset[1]) * size)
        image[shape_mask(obj.kind, centre, SIZES[obj.size] * size, size)] = COLOURS[obj.colour]
    return image


def render_clip(scene: Scene, size: int, frames: int, travel: float = 0.5) -> np.ndarray:
    """[frames, size, size, 3] uint8: the object moves `travel` of the canvas in its direction."""
    dx, dy = MOTIONS[scene.motion]
    steps = np.linspace(-travel / 2, travel / 2, frames)
    return np.stack([render(scene, size, (dx * s, dy * s)) for s in steps])
