"""Regional compilation: each repeated transformer block's forward is compiled, not the whole model, so
one compilation serves every block of a kind (19 + 38 in FLUX.1, 30 or 40 in Wan) and the compile time
stays short. By default ahead of time, into programs a later process loads without the compiler
(speed/precompile.py); else, and for a kind that cannot be, torch.compile just in time. The attention
call inside a block is compiled along when it is a plain kernel; sequence-parallel attention
(collectives) runs outside torch.compile's graphs."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sgdiff
from sgdiff.cache import cache_root

CONSTANTS: list = []  # functions whose result torch.compile may take as a constant (constant_under_compile)


def constant_under_compile(fn):
    """Mark `fn` (a pure function of its arguments, e.g. a GPU property) as a constant to torch.compile,
    so a compiled block does not break its graph at it. The mark is put on when something is compiled:
    torch.compiler's decorator imports torch._dynamo (1.6 s), which a run without compile never needs."""
    CONSTANTS.append(fn)
    return fn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a transformer repeats: the items of its module lists."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def compile_blocks(model: nn.Module, backend: str = "inductor", ahead: bool = True) -> int:
    """Compile the forward of every repeated block of `model` in place; returns how many.

    `ahead` (inductor only): each block kind's program compiled ahead of time and kept on disk
    (speed/precompile.py), which a later process loads without the compiler; otherwise, or where a kind
    cannot be, torch.compile compiles each kind at its first call (`backend`: inductor, or Dynamo's
    debugging backends such as eager in tests) and its graphs come from inductor's disk cache later."""
    device = next(model.parameters()).device
    blocks = repeated_blocks(model)
    if ahead and backend == "inductor":
        from sgdiff.speed.precompile import STATS, BlockKind, PrecompiledForward

        def just_in_time(forward):  # a kind without a program (speed/precompile.py)
            prepare_compiler(device)
            return torch.compile(forward, dynamic=False)

        folder = STATS.folder = compile_cache_dir(device) / "ahead"
        kinds: dict[type, BlockKind] = {}
        for block in blocks:
            kind = kinds.setdefault(type(block), BlockKind(type(block), folder, just_in_time))
            block.forward = PrecompiledForward(block, kind)
        return len(blocks)
    prepare_compiler(device)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
    return len(blocks)


def prepare_compiler(device: torch.device) -> None:
    """What compiling a block needs first (a second call changes nothing): inductor's disk caches in sgdiff's
    cache folder, the functions marked constant_under_compile, sgdiff's Triton kernels as ops inductor can trace.

    Inductor rounds to bf16 where eager does (emulate_precision_casts): fused kernels otherwise keep
    intermediates in float32 and drift from the reference's bf16 rounding (FLUX.1-dev at 1024²:
    1.3e-2 relative error against diffusers, beyond the 1e-2 agreement sgdiff keeps)."""
    import torch._inductor.config as inductor_config

    use_compile_cache(device)
    for fn in CONSTANTS:
        torch.compiler.assume_constant_result(fn)  # marks `fn` itself
    if importlib.util.find_spec("triton") is not None:
        import sgdiff.kernels.compiled_ops  # noqa: F401  (the fused kernels as ops inductor can trace)
    inductor_config.emulate_precision_casts = True


def compile_cache_dir(device: torch.device) -> Path:
    """Where torch.compile's work is kept between processes: the user's cache dir (XDG_CACHE_HOME or
    ~/.cache)/sgdiff/torch-compile/, one folder per torch and sgdiff version and device. Inside, torch's
    own caches key each compiled graph by its code, shapes, dtypes and config."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = f"torch-{torch.__version__}-sgdiff-{sgdiff.__version__}-{device_name}"
    return cache_root() / "torch-compile" / "".join(c if c.isalnum() or c in "-._+" else "_" for c in key)


def use_compile_cache(device: torch.device) -> str:
    """Point inductor's on-disk caches (compiled graphs, AOTAutograd, Triton kernels) at
    compile_cache_dir, unless the user chose a folder (TORCHINDUCTOR_CACHE_DIR); a second process then
    loads what the first compiled instead of compiling it again. Returns the folder."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # inductor writes its default there on first use
    folder = chosen if chosen and chosen != default_cache_dir() else str(compile_cache_dir(device))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder  # read by inductor whenever it looks for its caches
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def compile_cache_stats() -> dict[str, Any]:
    """This process's use of the on-disk caches so far: torch's own counters of graphs compiled just in time
    (zero where Dynamo was never imported), and the programs compiled ahead (speed/precompile.py)."""
    from sgdiff.speed.precompile import STATS

    counted = "torch._dynamo.utils" in sys.modules  # (importing it to read zeros would cost a second)
    counters = sys.modules["torch._dynamo.utils"].counters if counted else defaultdict(Counter)
    return {
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""),
        "graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "graph_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_cache_hits": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_misses": counters["aot_autograd"]["autograd_cache_miss"],
        "ahead": STATS.report(),
        "compiler_imported": "torch._inductor" in sys.modules or "torch._dynamo" in sys.modules,
    }
