"""How tests and benchmarks compare sgdiff's outputs with a reference."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randomize_weights(model: torch.nn.Module, seed: int, unscaled: tuple[str, ...] = ()) -> torch.nn.Module:
    """Every parameter its own random values (norm scales and biases too, so that a swapped name shows):
    norm weights near 1, biases small, other weights scaled by 1/sqrt(fan-in) so that activations stay of
    order one; parameters whose name holds one of `unscaled` (embeddings, say) of order one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif any(part in name for part in unscaled):
                p.copy_(noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model.eval()


def read_png(path) -> np.ndarray:
    """An output file's pixels, [H, W, 3] uint8."""
    return np.asarray(Image.open(path).convert("RGB"))


def pixels_beyond(paths, expected: np.ndarray, tolerance: int) -> tuple[int, int]:
    """(how many pixels of the PNGs at `paths` differ from `expected` by more than `tolerance` in a channel, how
    many pixels there are), the images as max_pixel_diff takes them."""
    assert len(paths) == len(expected)
    beyond = total = 0
    for path, reference in zip(paths, expected, strict=True):
        actual = read_png(path)
        assert actual.shape == reference.shape and actual.std() > 1
        beyond += int((np.abs(actual.astype(int) - reference.astype(int)).max(axis=-1) > tolerance).sum())
        total += reference.shape[0] * reference.shape[1]
    return beyond, total


def max_pixel_diff(paths, expected: np.ndarray) -> int:
    """The largest difference of any pixel between the PNGs at `paths` and the reference images `expected`
    ([N, H, W, 3] uint8; as many, of the same shapes); each PNG must be a real decoded image, not a constant."""
    assert len(paths) == len(expected)
    worst = 0
    for path, reference in zip(paths, expected, strict=True):
        actual = read_png(path)
        assert actual.shape == reference.shape
        assert actual.std() > 1
        worst = max(worst, int(np.abs(actual.astype(int) - reference.astype(int)).max()))
    return worst
