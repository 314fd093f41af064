"""Where a fused LoRA switch from a CPU copy of the base weights spends its time: FLUX.1-dev's transformer, two
random rank-64 adapters fused with the copy in page-locked CPU memory, set_scales timed, then profiled once
(torch.profiler: the top ops by CPU and by CUDA time)."""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_lora import BENCH_MODELS, seeded, write_adapters  # noqa: E402

from sgdiff.lora import apply_loras, read_lora  # noqa: E402
from sgdiff.models.flux import FluxTransformer  # noqa: E402

device = torch.device("cuda")
model = seeded(0, torch.bfloat16, device, lambda: FluxTransformer(BENCH_MODELS["flux.1-dev"].config))
folder = Path(tempfile.mkdtemp())
paths = write_adapters(model, 64, folder, device)
adapters = [read_lora(str(path)) for path in paths]
start = time.perf_counter()
handle = apply_loras(model, [(adapters[0], 1.0), (adapters[1], 0.0)], "fused", base_room=0)
torch.cuda.synchronize()
print(f"apply with the copy on {handle.applied.base_device}: {time.perf_counter() - start:.2f} s", flush=True)
for scales in ([0.0, 1.0], [1.0, 0.0], [0.0, 1.0]):
    torch.cuda.synchronize()
    start = time.perf_counter()
    handle.set_scales(scales)
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    print(f"set_scales {scales}: {time.perf_counter() - start:.3f} s (queued after {queued:.3f} s)", flush=True)
with torch.profiler.profile(
    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
) as prof:
    handle.set_scales([1.0, 0.0])
    torch.cuda.synchronize()
table = prof.key_averages()
print(table.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
print(table.table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
