"""A transformer's forward captured once as a CUDA graph per input signature and replayed: the host
launches one graph instead of thousands of kernels (and, with several GPUs, collectives), so the GPU
never waits for Python.

A signature is every tensor argument's shape, dtype, device and strides, every other argument's
value, and the attention implementation in use (sequence parallelism swaps it). Each call copies
its tensors into the graph's static inputs, replays, and returns a copy of the static output (CFG
calls the same graph twice per step)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from sgdiff.models.attention import current_attention_impl


@dataclass
class CapturedForward:
    inputs: list[torch.Tensor]  # the static inputs, in argument order
    output: Any  # the static output (tensors the replay overwrites)
    replay: Callable[[], None]


def capture_cuda_graph(forward: Callable, args: tuple, kwargs: dict) -> CapturedForward:
    """Warm forward up once outside the graph (lazy initialisation, kernel choice, communicators),
    then capture one call on static copies of the arguments."""
    leaves, spec = tree_flatten((args, kwargs))
    # static inputs on the GPU, whatever device the caller's tensors are on (a step index kept on the
    # host, say): a copy from host memory cannot happen inside the capture
    static = [x.to("cuda", copy=True) if isinstance(x, torch.Tensor) else x for x in leaves]
    static_args, static_kwargs = tree_unflatten(static, spec)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward(*static_args, **static_kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = forward(*static_args, **static_kwargs)
    return CapturedForward([x for x in static if isinstance(x, torch.Tensor)], output, graph.replay)


def signature(leaves: list) -> tuple:
    return tuple(
        (tuple(x.shape), x.dtype, x.device, x.stride()) if isinstance(x, torch.Tensor) else (type(x), x) for x in leaves
    )


class CudaGraphForward:
    """Replaces a module's forward: replayed graphs without autograd, the plain forward with it."""

    def __init__(
        self,
        forward: Callable,
        capture: Callable[[Callable, tuple, dict], CapturedForward] = capture_cuda_graph,
    ):
        self.forward = forward
        self.capture = capture
        self.graphs: dict[tuple, CapturedForward] = {}
        self.capture_seconds = 0.0  # warm-up call and capture, every signature so far

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        key = (str(spec), signature(leaves), current_attention_impl())  # holds the impl: no id reuse
        captured = self.graphs.get(key)
        if captured is None:
            start = time.perf_counter()
            captured = self.graphs[key] = self.capture(self.forward, args, kwargs)
            self.capture_seconds += time.perf_counter() - start
        for static, x in zip(captured.inputs, tensors, strict=True):
            static.copy_(x)
        captured.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, captured.output)
