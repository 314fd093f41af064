"""The one attention entry point of every sgdiff model.

Models call `attention(q, k, v)` (or `attention_alongside`, with independent work that an
implementation may run while its communication travels, or `joint_attention`, with the streams
before their q/k/v projections) and nothing else; a kernel choice or sequence parallelism is
swapped in here (see `use_attention_impl`), never inside a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sgdiff.models.streams import Stream, project_streams

# q, k, v: [B, S, H, D] -> out: [B, S, H, D]
AttentionImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# On CUDA, cuDNN's fused attention is the fastest SDPA kernel on Hopper (about 1.7x
# flash, docs/benchmarks.md); SDPA falls back down this list when a kernel cannot run.
_CUDA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention through PyTorch's SDPA, best kernel first."""
    # [B, S, H, D] -> [B, H, S, D] for SDPA, and back.
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda:
        with sdpa_kernel(_CUDA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


_impl: AttentionImpl = sdpa_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention. q, k, v: [B, S, H, D]; returns [B, S, H, D]."""
    return _impl(q, k, v)


def attention_alongside(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, work: Callable[[], Any]
) -> tuple[torch.Tensor, Any]:
    """(attention(q, k, v), work()) where `work` does not depend on the attention (FLUX's
    single-stream MLP). An implementation that moves q, k and v between GPUs first (Ulysses) runs
    `work` while they travel (its `alongside`); any other runs it first."""
    overlapping = getattr(_impl, "alongside", None)
    if overlapping is not None:
        return overlapping(q, k, v, work)
    done = work()
    return _impl(q, k, v), done


def joint_attention(
    streams: list[Stream], rope: torch.Tensor, heads: int, work: Callable[[], Any] = lambda: None
) -> tuple[torch.Tensor, Any]:
    """(attention over the streams' tokens joined in order [B, sum S_i, H, D], work()), from the
    streams before their projections (models/streams.py): q and k normed and rotated by rope
    [sum S_i, D/2, 2]. An implementation that can project elsewhere (Ulysses-2 moves the inputs
    instead of q, k and v: its `over_streams`) does; otherwise the streams are projected here and
    attended as `attention_alongside` does."""
    over_streams = getattr(_impl, "over_streams", None)
    if over_streams is not None:
        handled = over_streams(streams, rope, heads, work)
        if handled is not None:
            return handled
    q, k, v = project_streams(streams, rope, heads)
    return attention_alongside(q, k, v, work)


def current_attention_impl() -> AttentionImpl:
    """The implementation `attention` calls now."""
    return _impl


@contextmanager
def use_attention_impl(impl: AttentionImpl) -> Iterator[None]:
    """Route every model's attention through `impl` while the context is open."""
    global _impl
    previous, _impl = _impl, impl
    try:
        yield
    finally:
        _impl = previous
