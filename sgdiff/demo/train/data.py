"""Training batches: a seeded pool of scenes (never the held-out combinations), their token ids made
once, and pictures drawn on the training device as each batch is asked for."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sgdiff.demo.render import SceneTable, render_table
from sgdiff.demo.scenes import Scene, sample_training_scene


@dataclass
class ScenePool:
    scenes: list[Scene]
    table: SceneTable  # on the training device
    tokens: dict[str, torch.Tensor]  # per text encoder: [N, L] ids (and masks), on the training device

    @classmethod
    def sample(cls, count: int, seed: int, clip: bool, tokenize, device: torch.device) -> ScenePool:
        """`tokenize(captions) -> dict of [N, L] tensors`, exactly as generation tokenizes prompts."""
        rng = np.random.default_rng(seed)
        scenes = [sample_training_scene(rng, clip) for _ in range(count)]
        table = SceneTable.of(scenes)
        table = table.rows(torch.arange(count), device)
        tokens = {name: t.to(device) for name, t in tokenize([s.caption() for s in scenes]).items()}
        return cls(scenes, table, tokens)

    def sample_rows(self, size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self.scenes), (size,), generator=generator, device=generator.device)

    def pictures(self, rows: torch.Tensor, pixels: int, frames: int = 1) -> torch.Tensor:
        """[B, T, 3, H, W] in [-1, 1]."""
        return render_table(self.table.rows(rows, rows.device), pixels, frames).float() / 127.5 - 1

    def tokens_of(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t.index_select(0, rows) for name, t in self.tokens.items()}

    @torch.no_grad()
    def encode_all(self, encode, pixels: int, frames: int = 1, batch: int = 256) -> torch.Tensor:
        """`encode(pictures)` of every scene in the pool, in order, concatenated."""
        device = self.table.background.device
        chunks = torch.arange(len(self.scenes), device=device).split(batch)
        return torch.cat([encode(self.pictures(rows, pixels, frames)) for rows in chunks])
