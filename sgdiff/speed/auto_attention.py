"""`--attention-backend auto` on a CUDA GPU where FlashAttention is installed (speed/flash_attention.py):
cuDNN's fused attention (split at tile waves, speed/wave_split.py) or FlashAttention, whichever is faster
on this GPU at each shape, measured rather than assumed. Without FlashAttention `auto` is
wave_split_attention itself and nothing here runs.

The first call at a new (q shape, k shape, dtype, device) takes the pick an earlier process on this GPU
and software made (speed/attention_picks.py), else times the candidates on random inputs of that shape
(their own generator: the run's random numbers stay as they were): a few untimed calls each (FA4 compiles
its kernel at its first), then rounds of CUDA-event timings taken in turns; the winner is kept for the
process and on disk. FlashAttention must beat cuDNN by MARGIN, so that timing noise does not flip the
choice from run to run. A candidate that fails there (a broken install) is dropped with a warning.

Timing needs real kernels, run eagerly. In a CUDA graph's capture, under a dispatch mode (FlopCounterMode,
fake tensors) or inside a torch.compile trace a shape not measured yet runs cuDNN, not remembered, so a
later eager call measures it. A block compiled by speed/compile.py is the exception: there the choice is a
constant of the graph (constant_under_compile), taken by running the measurement at trace time.

The two round differently (both accumulate in float32; bf16 outputs differ by ~4e-3 relative): where their
times are close, the choice, and so an output's last bits, can differ between processes. `cudnn` or `fa`
fix the kernel.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from sgdiff.models.attention import AttentionImpl
from sgdiff.speed.attention_picks import Key, PickStore
from sgdiff.speed.compile import constant_under_compile

log = logging.getLogger(__name__)

MARGIN = 0.97  # another kernel wins only in under 97% of the default's (cuDNN's) time
WARMUP = 2  # untimed calls of each candidate
ROUNDS = 5  # timed samples of each, in turns; the median counts
CALLS = 3  # back-to-back calls per sample (the launches overlap the GPU's work, as in a forward)

Timer = Callable[[Callable[[], object]], float]  # ms per call of a function
CHOOSERS: weakref.WeakValueDictionary[int, MeasuredAttention] = weakref.WeakValueDictionary()  # by number
NUMBERS = itertools.count()


def cuda_ms(fn: Callable[[], object], calls: int = CALLS) -> float:
    """ms per call of `calls` back-to-back calls of `fn`, by CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


class MeasuredAttention:
    """An AttentionImpl that runs, at each shape, the fastest of `candidates` (name -> kernel; the first
    is the default, the one kept unless another beats it by MARGIN); `store`: picks kept across processes."""

    def __init__(self, candidates: dict[str, AttentionImpl], timer: Timer = cuda_ms, store: PickStore | None = None):
        self.candidates = dict(candidates)
        self.names = list(self.candidates)  # all of them, also after one is left out: the store's key
        self.default = self.names[0]
        self.timer = timer
        self.store = store
        self.winners: dict[Key, str] = {}
        self.timings: dict[Key, dict[str, float]] = {}  # median ms per call of each candidate
        self.number = next(NUMBERS)  # what measured_winner is given: a plain int is a constant to torch.compile
        CHOOSERS[self.number] = self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.candidates[self.choose(q, k)](q, k, v)

    def pieces(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(first head, [B, S, h_i, D]) pieces, as the chosen kernel gives them (parallel/sequence.py)."""
        kernel = self.candidates[self.choose(q, k)]
        pieces = getattr(kernel, "pieces", None)
        return pieces(q, k, v) if pieces is not None else [(0, kernel(q, k, v))]

    def choose(self, q: torch.Tensor, k: torch.Tensor) -> str:
        if torch.compiler.is_compiling() and not marked_constant():  # traced into a graph: no timing there
            return self.winners.get((tuple(q.shape), tuple(k.shape), q.dtype, q.device), self.default)
        return measured_winner(self.number, tuple(q.shape), tuple(k.shape), q.dtype, q.device.type, q.device.index)

    def pick(self, key: Key) -> str:
        """The kernel to run at `key`: a pick kept on disk by an earlier process, else measured (and kept)."""
        kept = self.store.get(key, self.names) if self.store is not None else None
        if kept is not None:
            kernel, ms = kept
            q, k = (torch.zeros(s, device=key[3], dtype=key[2]) for s in key[:2])
            if kernel == self.default or self.runs(kernel, q, k, k):
                self.timings[key] = ms
                q_shape, k_shape = list(key[0]), list(key[1])
                log.info("attention at q %s, k %s: %s, as measured by an earlier run", q_shape, k_shape, kernel)
                return kernel
        winner = self.measure(key)
        if self.store is not None:
            self.store.put(key, self.names, winner, self.timings[key])
        return winner

    def runs(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, calls: int = 1) -> bool:
        """Whether candidate `name` runs on q, k, v (`calls` times); another than the default that fails (a broken
        install) is left out, with a warning."""
        try:
            for _ in range(calls):
                self.candidates[name](q, k, v)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is left out, not the run's failure
            if name == self.default:
                raise
            log.warning("attention: %s cannot run (%s); auto leaves it out", name, exc)
            del self.candidates[name]
            return False
        return True

    def measure(self, key: Key) -> str:
        """Time every candidate at `key`'s shapes; the winner's name."""
        q_shape, k_shape, dtype, device = key
        generator = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(s, generator=generator, device=device, dtype=dtype) for s in (q_shape, k_shape, k_shape))
        runs = {
            name: lambda kernel=kernel: kernel(q, k, v)
            for name, kernel in list(self.candidates.items())
            if self.runs(name, q, k, v, calls=WARMUP)
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(ROUNDS):
            for name, run in runs.items():
                times[name].append(self.timer(run))
        ms = self.timings[key] = {name: statistics.median(t) for name, t in times.items()}
        best = min(ms, key=ms.__getitem__)
        winner = best if ms[best] < MARGIN * ms[self.default] else self.default
        log.info("attention at q %s, k %s, %s: %s (ms per call: %s)", list(q_shape), list(k_shape), dtype, winner,
                 ", ".join(f"{name} {t:.3f}" for name, t in ms.items()))  # fmt: skip
        return winner

    def choices(self) -> list[dict]:
        """What was measured and chosen so far, for reports (`sgdiff bench`)."""
        return [
            {"q": list(q), "k": list(k), "dtype": str(dtype).removeprefix("torch."), "ms": self.timings.get(key, {}),
             "kernel": winner}
            for key, winner in self.winners.items()
            for q, k, dtype, _ in [key]
        ]  # fmt: skip


@constant_under_compile  # a compiled block takes the choice as a constant: measured at trace time, no graph break
def measured_winner(
    number: int, q_shape: tuple, k_shape: tuple, dtype: torch.dtype, device_type: str, device_index: int | None
) -> str:
    """The kernel chooser `number` runs at these shapes: measured at the first call that can time kernels."""
    chooser = CHOOSERS[number]
    key = (q_shape, k_shape, dtype, torch.device(device_type, device_index))  # type: ignore[arg-type]  # (takes None)
    winner = chooser.winners.get(key)
    if winner is None:
        if not can_measure():
            return chooser.default
        with torch.no_grad():
            winner = chooser.winners[key] = chooser.pick(key)
    return winner


def can_measure() -> bool:
    """Whether kernels run for real here and now: not traced into a graph (except as compile_blocks' constant),
    not under a dispatch mode, not inside a CUDA graph's capture."""
    if torch.compiler.is_compiling() and not marked_constant():
        return False
    if is_in_torch_dispatch_mode():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def marked_constant() -> bool:
    """Whether torch.compile takes measured_winner as a constant (compile_blocks marked it): then it runs it
    for real while tracing, instead of tracing into it."""
    return getattr(measured_winner, "_dynamo_marked_constant", False)
