"""Repeated transformer blocks compiled ahead of time (AOTInductor): one program per block kind and input
signature, kept in the compile cache (speed/compile.py compile_cache_dir). A later process loads each program
through torch's C++ loader: it imports neither Dynamo nor inductor and traces nothing, so
--enable-torch-compile costs it milliseconds where torch.compile's graphs from the disk cache cost seconds
(the compiler's import, Dynamo's tracing of each block kind, the graphs' load; docs/benchmarks.md).

The block's weights are the program's inputs, not constants folded into it: one program serves every block
of its kind (19 + 38 in FLUX.1), and whatever the block holds when it runs (LoRA scales written by a switch,
weights lent by offloading, FP8 weights and their scales) is what the program reads, as the eager block would.

A kind that cannot be compiled ahead (an attention kernel outside torch's own ops such as FlashAttention or
SageAttention, sequence parallelism's collectives, inputs that are not plain tensors and scalars) runs
torch.compile's just-in-time graphs instead (speed/compile.py); an attempt that failed is kept on disk, so a
later process goes there at once."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sgdiff
from sgdiff.models.attention import current_attention_impl

log = logging.getLogger(__name__)

PLAIN = (int, float, bool, str, type(None))  # non-tensor inputs a program takes as constants (its key holds them)


@dataclass
class PrecompileStats:
    """This process's programs (the perf dump): compiled here, loaded from the disk cache, kinds that ran
    torch.compile's graphs instead; seconds spent compiling and loading."""

    folder: Path | None = None  # where they are kept
    built: int = 0
    loaded: int = 0
    just_in_time: int = 0
    build_seconds: float = 0.0
    load_seconds: float = 0.0

    def report(self) -> dict:
        rounded = {name: round(value, 3) if isinstance(value, float) else value for name, value in asdict(self).items()}
        return {**rounded, "folder": str(self.folder or "")}


STATS = PrecompileStats()


def block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """What a program reads besides its inputs, by name: the block's parameters, then its buffers."""
    return dict(itertools.chain(block.named_parameters(), block.named_buffers()))


def settings(block: nn.Module) -> tuple:
    """The plain values the block and its submodules hold (head counts, eps, kernel switches): a program
    takes them as constants, so blocks of one class that differ in one get programs of their own."""
    return tuple(
        (name, attribute, value)
        for name, module in block.named_modules()
        for attribute, value in sorted(vars(module).items())
        if not attribute.startswith("_")
        and (isinstance(value, PLAIN) or isinstance(value, tuple) and all(isinstance(v, PLAIN) for v in value))
    )


def unregistered_tensors(block: nn.Module) -> list[str]:
    """Tensors the block's modules hold outside their parameters and buffers: a program would bake them in."""
    return [
        f"{name}.{attribute}" if name else attribute
        for name, module in block.named_modules()
        for attribute, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    ]


def signature(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def input_key(value: Any) -> Any:
    """What of an input a program is compiled for: a tensor's layout, dtype and device; a plain value itself.
    Raises TypeError for anything else (a list, an object): such a call is not precompiled."""
    if isinstance(value, torch.Tensor):
        return signature(value)
    if isinstance(value, PLAIN):
        return value
    raise TypeError(f"a {type(value).__name__} input")


@dataclass
class Program:
    """A loaded AOTInductor package: its runner and how its flat outputs nest."""

    run: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    out_spec: Any

    def __call__(self, flat: list[torch.Tensor]) -> Any:
        from torch.utils._pytree import tree_unflatten

        return tree_unflatten(self.run(flat), self.out_spec)


def load_program(path: Path, device: torch.device) -> Program:
    """The package at `path` through torch's C++ loader (no compiler import), single-threaded so that a CUDA
    graph may capture its kernels."""
    from torch.utils._pytree import treespec_loads

    index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else -1
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, index)
    return Program(loader.run, treespec_loads(loader.get_call_spec()[1]))


class Unexportable(Exception):
    """A block kind that runs, but not as a program compiled ahead (the reason says why)."""


class BlockKind:
    """The blocks of one class in one model: their programs by input signature, and the way back to
    torch.compile's graphs (`just_in_time`) where a program cannot be made."""

    def __init__(self, block_type: type, folder: Path, just_in_time: Callable[[Callable], Callable]):
        self.name = f"{block_type.__module__}.{block_type.__qualname__}"
        self.folder = folder
        self.just_in_time = just_in_time  # forward -> its torch.compile'd form
        self.programs: dict[tuple, Program] = {}
        self.unexportable: str | None = None

    def load_or_build(self, key: tuple, block: nn.Module, eager: Callable, args: tuple, kwargs: dict) -> Program | None:
        """The program for `key`, which this process has not loaded: from the disk cache, else compiled now
        (None: it cannot be; the kind then runs just in time)."""
        reason = not_precompilable(key[0])
        if reason is not None:
            self.give_up(reason, announce=False)
            return None
        # on disk: the key without the attention object (context() names it; its repr holds an address)
        digest = hashlib.sha256(repr((self.name, key[1:], context())).encode()).hexdigest()[:40]
        path, failed = self.folder / f"{digest}.pt2", self.folder / f"{digest}.failed"
        if failed.exists():
            self.give_up(failed.read_text(encoding="utf-8").strip(), announce=False)
            return None
        device = next(iter(block_tensors(block).values())).device
        try:
            if not path.exists():
                build(path, block, eager, args, kwargs)
            started = time.perf_counter()
            program = self.programs[key] = load_program(path, device)
            STATS.load_seconds += time.perf_counter() - started
            STATS.loaded += 1
            return program
        except Exception as exc:  # noqa: BLE001 - any failure here leaves torch.compile's way, which still works
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            self.folder.mkdir(parents=True, exist_ok=True)
            failed.write_text(reason + "\n", encoding="utf-8")
            self.give_up(reason, announce=True)
            return None

    def give_up(self, reason: str, announce: bool) -> None:
        self.unexportable = reason
        STATS.just_in_time += 1
        (log.warning if announce else log.info)(
            "%s cannot be compiled ahead (%s): torch.compile compiles it at its first call instead", self.name, reason
        )


def build(path: Path, block: nn.Module, eager: Callable, args: tuple, kwargs: dict) -> None:
    """Export `eager` (the block's forward) with its weights as inputs, compile it with AOTInductor into a
    package at `path` (written whole or not at all). Raises Unexportable where the program would not be
    the block's: tensors held outside its parameters and buffers would be baked in as constants (tensors its
    forward makes from plain values are the same for every block of the kind, and are)."""
    from torch._inductor import aoti_compile_and_package
    from torch.nn.utils.stateless import _reparametrize_module

    from sgdiff.speed.compile import prepare_compiler

    unregistered = unregistered_tensors(block)
    if unregistered:
        raise Unexportable(f"it holds tensors outside its parameters and buffers ({', '.join(unregistered[:3])})")
    device = next(iter(block_tensors(block).values())).device
    prepare_compiler(device)
    if device.type == "cuda":
        from sgdiff.speed.cuda_toolkit import ensure_cuda_home

        ensure_cuda_home()  # (without a toolkit: one made of pip's CUDA headers and the driver)
    started = time.perf_counter()

    class WeightsAsInputs(nn.Module):  # holds no module: the weights are its forward's first input
        def forward(self, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
            with _reparametrize_module(block, weights):
                return eager(*args, **kwargs)

    exported = torch.export.export(WeightsAsInputs(), (block_tensors(block), args, kwargs), strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    options = {"emulate_precision_casts": True}  # bf16 rounding where eager rounds (speed/compile.py)
    try:
        aoti_compile_and_package(exported, package_path=str(partial), inductor_configs=options)
        os.replace(partial, path)  # another process compiling the same program meanwhile writes the same
    finally:
        partial.unlink(missing_ok=True)
    STATS.built += 1
    STATS.build_seconds += time.perf_counter() - started


class PrecompiledForward:
    """A block's forward as its kind's program for the call's inputs; torch.compile's graph where the kind
    has no program. Holds the block weakly (the block holds this)."""

    def __init__(self, block: nn.Module, kind: BlockKind):
        forward = block.forward
        bound = getattr(forward, "__self__", None) is block
        self.block = weakref.ref(block)
        self.function = forward.__func__ if bound else forward  # type: ignore[attr-defined]
        self.bound = bound
        self.kind = kind
        self.compiled: Callable | None = None  # torch.compile's form, once the kind has no program
        # taken at the first call: the speed toggles, adapters and FP8 weights are in place before compile_blocks,
        # and what changes later (offloading, adapter switches) changes these tensors' contents, not the tensors
        self.tensors: dict[str, torch.Tensor] | None = None
        self.weights: list[torch.Tensor] = []  # the tensors' values, in the program's input order
        self.settings: tuple = ()

    def eager(self, block: nn.Module) -> Callable:
        return self.function.__get__(block) if self.bound else self.function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block()
        assert block is not None  # (the block calls its own forward)
        if torch.compiler.is_compiling():  # traced by a caller's compile or export: the block's own code
            return self.eager(block)(*args, **kwargs)
        program = self.program(block, args, kwargs)
        if program is not None:
            inputs = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
            return program([*self.weights, *inputs])
        if self.compiled is None:
            self.compiled = self.kind.just_in_time(self.eager(block))
        return self.compiled(*args, **kwargs)

    def program(self, block: nn.Module, args: tuple, kwargs: dict) -> Program | None:
        """The kind's program for this call (None: the kind has none)."""
        if self.kind.unexportable is not None:
            return None
        if self.tensors is None:
            self.tensors, self.settings = block_tensors(block), settings(block)
            self.weights = list(self.tensors.values())
        try:
            key = (
                current_attention_impl(),
                tuple(map(input_key, args)),
                tuple((name, input_key(value)) for name, value in kwargs.items()),
                tuple((name, signature(tensor)) for name, tensor in self.tensors.items()),
                self.settings,
                torch.is_grad_enabled(),
            )
        except TypeError as exc:
            self.kind.give_up(f"it takes {exc}", announce=True)
            return None
        found = self.kind.programs.get(key)
        return found if found is not None else self.kind.load_or_build(key, block, self.eager(block), args, kwargs)


_SOURCES: str | None = None


def context() -> tuple:
    """What a program depends on beyond its block's class and inputs: sgdiff's own code (a checkout's edits
    change it without a new version), the attention kernel's name, matmul precision; torch, sgdiff and the
    device are the cache folder's name (speed/compile.py compile_cache_dir)."""
    global _SOURCES
    if _SOURCES is None:
        digest = hashlib.sha256()
        root = Path(sgdiff.__file__).parent
        for file in sorted(root.rglob("*.py")):
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
        _SOURCES = digest.hexdigest()
    impl = current_attention_impl()
    impl_name = ".".join(str(getattr(impl, name, "")) for name in ("__module__", "__qualname__", "__name__"))
    return _SOURCES, impl_name, torch.get_float32_matmul_precision(), triton_version()


def triton_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None


def not_precompilable(impl: Callable) -> str | None:
    """Why an attention implementation keeps blocks from being compiled ahead (None: it does not): sequence
    parallelism's collectives and a kernel chosen by timing at run time (`auto` with FlashAttention)."""
    if getattr(impl, "alongside", None) is not None or getattr(impl, "over_streams", None) is not None:
        return "sequence parallelism exchanges data inside its attention"
    if type(impl).__name__ == "MeasuredAttention":
        return "its attention kernel is picked by timing at run time"
    return None
