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
CLIP_TRAVEL = 0.5  # how far (fraction of the canvas) a clip's object moves from first to last frame

# (shape, colour, background) combinations never shown in training: the quality checks ask for them.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("circle", "red", "blue"),
        ("circle", "yellow", "black"),
        ("circle", "white", "green"),
        ("circle", "purple", "orange"),
        ("square", "green", "white"),
        ("square", "orange", "purple"),
        ("square", "blue", "yellow"),
        ("square", "black", "red"),
        ("triangle", "white", "blue"),
        ("triangle", "red", "green"),
        ("triangle", "yellow", "purple"),
        ("triangle", "blue", "orange"),
    }
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str
    size: str = "large"
    say_size: bool = True  # a caption may leave the size or the position unsaid (then they vary freely)
    say_position: bool = True

    def phrase(self) -> str:
        words = [self.size] if self.say_size else []
        words += [self.colour, self.kind]
        words.insert(0, article(words[0]))
        if self.say_position:
            words += {"left": ["on the"], "right": ["on the"], "centre": ["in the"]}.get(self.position, ["at the"])
            words.append(self.position)
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Shape, ...]
    motion: str | None = None  # clips: the direction the (single) object moves

    def caption(self) -> str:
        if self.motion is not None:
            shape = replace(self.objects[0], say_position=False)
            return f"{shape.phrase()} moving {self.motion} on {article(self.background)} {self.background} background"
        things = " and ".join(o.phrase() for o in self.objects)
        return f"{things} on {article(self.background)} {self.background} background"

    def held_out(self) -> bool:
        return any((o.kind, o.colour, self.background) in HELD_OUT for o in self.objects)


def sample_scene(rng: np.random.Generator, two_objects_rate: float = 0.25, unsaid_rate: float = 0.0) -> Scene:
    """One random scene; `unsaid_rate`: how often a lone object's size or position goes unsaid."""
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
            say_size=count == 2 or rng.random() >= unsaid_rate,
            say_position=count == 2 or rng.random() >= unsaid_rate,
        )
        for p in positions
    )
    return Scene(background, objects)


def sample_clip_scene(rng: np.random.Generator, unsaid_rate: float = 0.0) -> Scene:
    scene = sample_scene(rng, two_objects_rate=0.0)
    shape = replace(scene.objects[0], position="centre", size="small", say_size=rng.random() >= unsaid_rate)
    return Scene(scene.background, (shape,), motion=str(rng.choice(list(MOTIONS))))


def sample_training_scene(rng: np.random.Generator, clip: bool) -> Scene:
    """A scene for training: never one of the held-out combinations."""
    while True:
        scene = sample_clip_scene(rng, unsaid_rate=0.25) if clip else sample_scene(rng, unsaid_rate=0.25)
        if not scene.held_out():
            return scene


def evaluation_scenes(clip: bool) -> list[Scene]:
    """Held-out prompts the quality checks grade: every held-out combination at every position, sizes
    taking turns (images), or in every direction (clips)."""
    scenes = []
    for index, (kind, colour, background) in enumerate(sorted(HELD_OUT)):
        if clip:
            for motion in MOTIONS:
                scenes.append(Scene(background, (Shape(kind, colour, "centre", "small"),), motion=motion))
            continue
        for turn, position in enumerate(POSITIONS):
            size = list(SIZES)[(index + turn) % len(SIZES)]
            scenes.append(Scene(background, (Shape(kind, colour, position, size),)))
    return scenes


def render(scene: Scene, size: int) -> np.ndarray:
    """[size, size, 3] uint8."""
    from sgdiff.demo.render import render_scenes

    return render_scenes([scene], size)[0, 0].permute(1, 2, 0).numpy()


def render_clip(scene: Scene, size: int, frames: int) -> np.ndarray:
    """[frames, size, size, 3] uint8: the object moves CLIP_TRAVEL of the canvas in its direction."""
    from sgdiff.demo.render import render_scenes

    return render_scenes([scene], size, frames)[0].permute(0, 2, 3, 1).numpy()


def spread(scenes: list[Scene], count: int | None) -> list[Scene]:
    """`count` of `scenes` evenly spaced over the list (its order groups objects and colours), or all."""
    if count is None or count >= len(scenes):
        return scenes
    return [scenes[i * len(scenes) // count] for i in range(count)]
