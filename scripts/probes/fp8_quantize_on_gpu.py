"""On a CUDA GPU: a Linear's FP8 weight quantised on the GPU from CPU memory (Linear.to_fp8(on=cuda), what
--dit-precision fp8 with --cpu-offload does since weights wait in CPU memory) is bit for bit the one the CPU
quantises, for FLUX.1-dev's Linear shapes with random bf16 weights; prints the time of each."""

import time

import torch

from sgdiff.models.layers import Linear

torch.manual_seed(0)
for out_features, in_features in ((3072, 3072), (12288, 3072), (3072, 15360), (18432, 3072)):
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    on_cpu, on_gpu = (Linear(in_features, out_features, dtype=torch.bfloat16) for _ in range(2))
    for linear in (on_cpu, on_gpu):
        linear.weight.data.copy_(weight)
    start = time.perf_counter()
    on_cpu.to_fp8()
    cpu_s = time.perf_counter() - start
    start = time.perf_counter()
    on_gpu.to_fp8(on=torch.device("cuda"))
    gpu_s = time.perf_counter() - start
    same = torch.equal(on_cpu.weight.view(torch.uint8), on_gpu.weight.view(torch.uint8)) and torch.equal(
        on_cpu.weight_scale, on_gpu.weight_scale
    )
    assert on_gpu.weight.device.type == "cpu" and on_gpu.weight_scale.device.type == "cpu"
    print(f"[{out_features}, {in_features}]: CPU {cpu_s * 1e3:.1f} ms, GPU {gpu_s * 1e3:.1f} ms, identical: {same}")
    assert same
print("fp8 quantised on the GPU: identical to the CPU's")
