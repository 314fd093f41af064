"""Timing helpers shared by the benchmark scripts (CUDA events, interleaved variants, profiles)."""

from __future__ import annotations

import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def time_call(fn) -> float:
    """Milliseconds for one call: CUDA events on the GPU, the host clock on the CPU."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def join_nccl_group() -> torch.device:
    """Under torchrun: this rank's GPU, made current, in an NCCL process group (NVLink multicast left
    off: the symmetric-memory probes never use it, and shared hosts may forbid it)."""
    import os

    import torch.distributed as dist

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def time_interleaved(variants: dict, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Round-robin over the variants so clock and thermal drift hit all of them alike (sgdiff bench's)."""
    from sgdiff.bench.run import interleaved_times

    return interleaved_times(variants, torch.device(DEVICE), warmup, repeat)


def profiled_call(fn):
    """torch.profiler's record of one call of fn (host ops, and the GPU's kernels on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return prof


def print_top_kernels(fn, rows: int = 15, show: bool = True) -> None:
    """Profile one call of fn and print its top kernels (show=False: run it profiled, print nothing:
    the other ranks of a parallel run, which must take part)."""
    prof = profiled_call(fn)
    if not show:
        return
    sort_by = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))


def speed_matrix(model, call, warmup: int, repeat: int, baseline: dict | None = None) -> tuple[dict, dict]:
    """sgdiff's speed toggles added one after another on `model` (call() runs one forward): SDPA's own
    kernel choice -> cuDNN (--attention-backend auto) -> + CUDA graph; fused GELU (+ graph); fused
    projections (+ graph); fused norms (+ graph; CUDA only); + regional torch.compile (+ graph).
    `baseline` (name -> fn, e.g. diffusers) is timed in the same rounds as the first group. Returns
    (variant -> list of ms, {"compile_s": the first compiled call's seconds}); the toggles are the
    ones `sgdiff generate` applies (sgdiff/speed/). The model is left fused and compiled."""
    from sgdiff.families.flux import FAMILY as FLUX
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.speed.attention_backends import attention_backend
    from sgdiff.speed.compile import compile_blocks
    from sgdiff.speed.cuda_graph import CudaGraphForward
    from sgdiff.speed.fuse import fuse_gelu, fuse_norms, fuse_projections

    device, dtype = torch.device(DEVICE), torch.bfloat16
    sdpa, auto = attention_backend("sdpa", device, dtype), attention_backend("auto", device, dtype)

    def under(impl, fn):
        def run():
            with use_attention_impl(impl):
                return fn()

        return run

    def graphed():  # a fresh capture of the model as it is now
        return under(auto, CudaGraphForward(call) if DEVICE == "cuda" else call)

    times = time_interleaved(
        {
            **(baseline or {}),
            "sgdiff, SDPA's kernel choice": under(sdpa, call),
            "sgdiff, cuDNN attention (auto)": under(auto, call),
            "sgdiff, auto + CUDA graph": graphed(),
        },
        warmup,
        repeat,
    )
    fusable = FLUX.fusable(model)
    fuse_gelu(fusable)  # (before fusing projections: a Linear with a GELU epilogue stays its own GEMM)
    times |= time_interleaved(
        {"sgdiff, auto + fused GELU": under(auto, call), "sgdiff, auto + fused GELU + CUDA graph": graphed()},
        warmup,
        repeat,
    )
    fuse_projections(fusable)
    times |= time_interleaved(
        {"sgdiff, auto + fused GELU + projections": under(auto, call), "sgdiff, auto + fused + CUDA graph": graphed()},
        warmup,
        repeat,
    )
    fused = "fused"
    if DEVICE == "cuda":  # (the Triton kernels; on the CPU they run only in Triton's interpreter)
        fuse_norms(model)
        fused = "fused + norms"
        times |= time_interleaved(
            {"sgdiff, auto + fused + norms": under(auto, call), "sgdiff, auto + fused + norms + CUDA graph": graphed()},
            warmup,
            repeat,
        )
    compile_blocks(model)
    start = time.perf_counter()
    under(auto, call)()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    times |= time_interleaved(
        {
            f"sgdiff, auto + {fused} + compile": under(auto, call),
            f"sgdiff, all ({fused}, compile, CUDA graph)": graphed(),
        },
        warmup,
        repeat,
    )
    return times, {"compile_s": compile_s}


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("barrier", ("signal_barrier",)),
    ("attention", ("fmha", "flash", "cudnn", "attention")),
    ("GEMM", ("gemm", "nvjet", "xmma", "cutlass", "matmul")),
    ("NCCL", ("nccl",)),
    ("copy", ("copy", "memcpy", "cat", "stack")),
    ("Triton (sgdiff, inductor)", ("triton", "_kernel")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def kernel_time_by_kind(fn, calls: int = 3) -> dict[str, float]:
    """ms per call of GPU kernel time by kind (GEMM, attention, copies, ...) over `calls` calls of fn,
    plus "busy" (the union of kernel intervals), "span" (first kernel's start to last kernel's end)
    and "idle" (span - busy: the GPU waiting on the host, a peer or a dependency). Works on CUDA graph
    replays too (the profiler sees the graph's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = gpu_kernels(prof)
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.name)
        kinds[kind] = kinds.get(kind, 0.0) + e.time_range.elapsed_us() / 1e3 / calls
    span = (max(e.time_range.end for e in kernels) - kernels[0].time_range.start) if kernels else 0.0
    idle = sum(gap for gap, _, _ in idle_gaps(kernels))
    return kinds | {"busy": (span - idle) / 1e3 / calls, "span": span / 1e3 / calls, "idle": idle / 1e3 / calls}


def gpu_kernels(prof) -> list:
    """The profile's GPU events (kernels, copies, memsets of every stream), by start time."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0]
    return sorted(kernels, key=lambda e: e.time_range.start)


def idle_gaps(kernels: list) -> list[tuple[float, str, str]]:
    """Every stretch (µs) in which no stream of the GPU runs anything, between the first and the last
    kernel, with the kernel that ended last before it and the one that starts it."""
    gaps, reach, last = [], float("-inf"), ""
    for e in kernels:
        if e.time_range.start > reach and last:
            gaps.append((e.time_range.start - reach, last, e.name))
        if e.time_range.end > reach:
            reach, last = e.time_range.end, e.name
    return gaps


def export_trace(fn, path, write: bool, rows: int = 8) -> None:
    """Profile one call of fn and, where `write`, save its Chrome trace at `path` (every stream's
    kernels and copies on one timeline: open it in Perfetto or chrome://tracing) and print where the
    GPU idles longest, by the kernels around the gaps. Every rank of a parallel mode calls this (its
    ranks wait for each other); one writes."""
    prof = profiled_call(fn)
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    if DEVICE != "cuda":
        print(f"trace: {path}")
        return
    gaps = idle_gaps(gpu_kernels(prof))
    print(f"trace: {path} ({sum(g for g, _, _ in gaps) / 1e3:.2f} ms of GPU idle in {len(gaps)} gaps)")
    by_pair: dict[tuple[str, str], list[float]] = {}
    for gap, before, after in gaps:
        by_pair.setdefault((before[:50], after[:50]), []).append(gap)
    for (before, after), found in sorted(by_pair.items(), key=lambda item: -sum(item[1]))[:rows]:
        print(f"  {sum(found) / 1e3:6.2f} ms in {len(found):4d} gaps  after {before:50}  before {after}")
