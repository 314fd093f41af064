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


def time_interleaved(variants: dict, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Round-robin over the variants so clock and thermal drift hit all of them alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            times[name].append(time_call(fn))
    return times


def print_top_kernels(fn, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    sort_by = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))
