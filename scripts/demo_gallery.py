"""Render the README's pictures of the embedded demo models (real outputs, CPU, the presets' settings).

    python scripts/demo_gallery.py [--out docs/demo]

Writes grid.png (12 images, 4 per row, prompts in GRID_PROMPTS order) and video_first_last.png (each
row: a clip's first and last frame) and prints the prompts as a Markdown list.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdiff.engine.runner import ModelRunner  # noqa: E402
from sgdiff.io.image import save_png  # noqa: E402

GRID_PROMPTS = [
    "a red circle on a blue background",  # held out of training: the colour pair was never shown
    "a large green square at the top on a white background",  # held out
    "a small white triangle on the right on a blue background",  # held out
    "a large yellow circle in the centre on a purple background",
    "a small orange square on the left on a black background",
    "a large purple triangle at the bottom on a yellow background",
    "a small blue circle at the top and a small red square at the bottom on a white background",
    "a small green triangle on the left and a small yellow circle on the right on a black background",
    "a large black square in the centre on an orange background",
    "a white circle on a red background",
    "a small red triangle at the top on a green background",  # held out
    "an orange circle on the right on a blue background",
]
VIDEO_PROMPTS = [
    "a small red circle moving right on a blue background",  # held out
    "a small yellow triangle moving up on a black background",
    "a small green square moving left on a white background",  # held out
]
GAP = 4


def grid(tiles: list[np.ndarray], columns: int, scale: int) -> np.ndarray:
    """Tiles [H, W, 3] upscaled `scale`x (nearest), in rows of `columns`, on a white canvas."""
    h, w = tiles[0].shape[0] * scale, tiles[0].shape[1] * scale
    rows = -(-len(tiles) // columns)
    canvas = np.full((rows * (h + GAP) - GAP, columns * (w + GAP) - GAP, 3), 255, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        canvas[r * (h + GAP) : r * (h + GAP) + h, c * (w + GAP) : c * (w + GAP) + w] = np.kron(
            tile, np.ones((scale, scale, 1), dtype=np.uint8)
        )
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/demo"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    image_engine = ModelRunner("sgdiff/demo-image")
    images = [image_engine.generate(image_engine.sampling_params(p)).images[0] for p in GRID_PROMPTS]
    save_png(grid(images, 4, 1), args.out / "grid.png", {"prompts": GRID_PROMPTS})
    video_engine = ModelRunner("sgdiff/demo-video")
    clips = [video_engine.generate(video_engine.sampling_params(p)).videos[0] for p in VIDEO_PROMPTS]
    first_last = [frame for clip in clips for frame in (clip[0], clip[-1])]
    save_png(grid(first_last, 2, 2), args.out / "video_first_last.png", {"prompts": VIDEO_PROMPTS})
    for index, prompt in enumerate(GRID_PROMPTS):
        print(f"{index + 1}. {prompt}")
    for prompt in VIDEO_PROMPTS:
        print(f"- {prompt}")


if __name__ == "__main__":
    main()
