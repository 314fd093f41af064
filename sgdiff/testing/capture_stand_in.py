"""A CPU stand-in for CUDA graph capture (speed/cuda_graph.py), for the tests of --enable-cuda-graph."""

from __future__ import annotations

import torch

from sgdiff.speed.cuda_graph import CapturedForward


class CountingCapture:
    """'Capture' runs the forward once on static copies of its inputs; 'replay' runs it again on them.
    Counts the captures."""

    def __init__(self):
        self.captures = 0

    def __call__(self, forward, args, kwargs) -> CapturedForward:
        self.captures += 1
        static_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        holder = {"out": forward(*static_args, **kwargs)}

        def replay():
            holder["out"].copy_(forward(*static_args, **kwargs))

        return CapturedForward([a for a in static_args if isinstance(a, torch.Tensor)], holder["out"], replay)
