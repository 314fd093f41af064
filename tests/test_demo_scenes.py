"""The demo's synthetic data and the checks that read generated pictures: on rendered ground truth the
checks must be right every time (they later grade the trained models)."""

from __future__ import annotations

import numpy as np
import pytest

from sgdiff.demo.checks import motion, read
from sgdiff.demo.scenes import (
    COLOURS,
    MOTIONS,
    SHAPES,
    Scene,
    Shape,
    render,
    render_clip,
    sample_clip_scene,
    sample_scene,
)


def test_captions_say_what_is_drawn():
    scene = Scene("blue", (Shape("circle", "red", "left", "small"),))
    assert scene.caption() == "a small red circle on the left on a blue background"
    two = Scene("white", (Shape("square", "green", "top", "small"), Shape("triangle", "black", "centre", "small")))
    assert (
        two.caption()
        == "a small green square at the top and a small black triangle in the centre on a white background"
    )
    clip = Scene("black", (Shape("triangle", "yellow", "centre", "small"),), motion="up")
    assert clip.caption() == "a small yellow triangle moving up on a black background"


def test_sampling_is_seeded_and_varied():
    first = [sample_scene(np.random.default_rng(3)).caption() for _ in range(2)]
    assert first[0] == first[1]
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(400)]
    assert {o.kind for s in scenes for o in s.objects} == set(SHAPES)
    assert {s.background for s in scenes} == set(COLOURS)
    assert any(len(s.objects) == 2 for s in scenes) and all(o.colour != s.background for s in scenes for o in s.objects)


@pytest.mark.parametrize("size", [64, 128])
def test_checks_read_rendered_scenes_exactly(size):
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = sample_scene(rng, two_objects_rate=0.0)
        reading = read(render(scene, size))
        obj = scene.objects[0]
        assert (reading.background, reading.colour) == (scene.background, obj.colour), scene.caption()
        assert reading.position() == obj.position, scene.caption()
        assert reading.shape() == obj.kind, (scene.caption(), reading.fill_ratio)


def test_motion_is_read_from_clips():
    rng = np.random.default_rng(2)
    for _ in range(40):
        scene = sample_clip_scene(rng)
        frames = render_clip(scene, 64, 9)
        assert frames.shape == (9, 64, 64, 3)
        assert motion(frames) == scene.motion
    assert set(MOTIONS) == {"left", "right", "up", "down"}


def test_noise_reads_as_nothing_in_particular():
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    still = np.stack([noise, noise])
    assert motion(still) is None
