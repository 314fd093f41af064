"""Draw demo scenes in batches with torch (on any device), the one renderer for training and tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgdiff.demo.scenes import CLIP_TRAVEL, COLOURS, MOTIONS, POSITIONS, SHAPES, SIZES, Scene

MAX_OBJECTS = 2
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.uint8)  # [K, 3]
COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}


@dataclass
class SceneTable:
    """Scenes as tensors (one row per scene, MAX_OBJECTS slots per row)."""

    background: torch.Tensor  # [N] palette index
    kind: torch.Tensor  # [N, M] index into SHAPES
    colour: torch.Tensor  # [N, M] palette index
    centre: torch.Tensor  # [N, M, 2] (x, y), fractions of the canvas
    half: torch.Tensor  # [N, M] half-extent, fraction of the canvas
    present: torch.Tensor  # [N, M] bool
    motion: torch.Tensor  # [N, 2] direction (dx, dy); zeros for still images

    @classmethod
    def of(cls, scenes: list[Scene]) -> SceneTable:
        n = len(scenes)
        table = cls(
            background=torch.tensor([COLOUR_INDEX[s.background] for s in scenes]),
            kind=torch.zeros(n, MAX_OBJECTS, dtype=torch.long),
            colour=torch.zeros(n, MAX_OBJECTS, dtype=torch.long),
            centre=torch.zeros(n, MAX_OBJECTS, 2, dtype=torch.float64),
            half=torch.zeros(n, MAX_OBJECTS, dtype=torch.float64),
            present=torch.zeros(n, MAX_OBJECTS, dtype=torch.bool),
            motion=torch.tensor([MOTIONS[s.motion] if s.motion else (0.0, 0.0) for s in scenes], dtype=torch.float64),
        )
        for row, scene in enumerate(scenes):
            for slot, obj in enumerate(scene.objects):
                table.kind[row, slot] = SHAPES.index(obj.kind)
                table.colour[row, slot] = COLOUR_INDEX[obj.colour]
                table.centre[row, slot] = torch.tensor(POSITIONS[obj.position], dtype=torch.float64)
                table.half[row, slot] = SIZES[obj.size]
                table.present[row, slot] = True
        return table

    def rows(self, index: torch.Tensor, device: torch.device | str) -> SceneTable:
        return SceneTable(*(getattr(self, f).index_select(0, index).to(device) for f in self.__dataclass_fields__))


def shape_masks(kind: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, size: int) -> torch.Tensor:
    """[..., size, size] bool masks. kind [...], centre [..., 2] and half [...] in pixels."""
    grid = torch.arange(size, device=centre.device, dtype=centre.dtype) + 0.5
    dx = grid.view(1, size) - centre[..., 0, None, None]  # [..., 1, size]
    dy = grid.view(size, 1) - centre[..., 1, None, None]  # [..., size, 1]
    h = half[..., None, None]
    circle = dx**2 + dy**2 <= h**2
    square = (dx.abs() <= h) & (dy.abs() <= h)
    triangle = (dy <= h) & (dy >= -h) & (dx.abs() <= (dy + h) / 2)  # pointing up
    k = kind[..., None, None]
    return torch.where(k == 0, circle, torch.where(k == 1, square, triangle))


def render_table(table: SceneTable, size: int, frames: int = 1) -> torch.Tensor:
    """[N, T, 3, size, size] uint8. Over T frames each object moves CLIP_TRAVEL along its row's motion."""
    device = table.background.device
    palette = PALETTE.to(device)
    steps = torch.linspace(-CLIP_TRAVEL / 2, CLIP_TRAVEL / 2, frames, dtype=torch.float64, device=device)
    if frames == 1:
        steps = torch.zeros(1, dtype=torch.float64, device=device)
    # centre per frame: [N, T, M, 2]
    centre = table.centre[:, None] + table.motion[:, None, None, :] * steps[None, :, None, None]
    n, m = table.kind.shape
    masks = shape_masks(
        table.kind[:, None].expand(n, frames, m),
        centre * size,
        (table.half * size)[:, None].expand(n, frames, m),
        size,
    )  # [N, T, M, S, S]
    masks &= table.present[:, None, :, None, None]
    image = palette[table.background][:, None, :, None, None].expand(n, frames, 3, size, size).clone()
    for slot in range(m):  # later objects are drawn over earlier ones
        colour = palette[table.colour[:, slot]][:, None, :, None, None]  # [N, 1, 3, 1, 1]
        image = torch.where(masks[:, :, slot, None], colour, image)
    return image


def render_scenes(scenes: list[Scene], size: int, frames: int = 1) -> torch.Tensor:
    """[N, T, 3, size, size] uint8 on the CPU."""
    return render_table(SceneTable.of(scenes), size, frames)
