"""On a CUDA GPU: a Linear's FP8 weight quantised on the GPU from CPU memory (Linear.to_fp8(on=cuda), what
--dit-precision fp8 with --cpu-offload does since the weights wait in CPU memory) must be bit for bit the one an
in-memory model gets (its weight on the GPU, quantised there), for FLUX.1-dev's Linear shapes with random bf16
weights. Also says whether the CPU's own quantisation gives the same bytes (CUDA divides by a scalar through its
reciprocal, so a scale may differ in its last bit) and prints the time of each."""

import time

import torch

from sgdiff.models.layers import Linear

torch.manual_seed(0)
cuda = torch.device("cuda")
for out_features, in_features in ((3072, 3072), (12288, 3072), (3072, 15360), (18432, 3072)):
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    in_memory, offloaded, on_cpu = (Linear(in_features, out_features, dtype=torch.bfloat16) for _ in range(3))
    for linear in (in_memory, offloaded, on_cpu):
        linear.weight.data.copy_(weight)
    in_memory.to(cuda).to_fp8()
    start = time.perf_counter()
    offloaded.to_fp8(on=cuda)
    gpu_s = time.perf_counter() - start
    start = time.perf_counter()
    on_cpu.to_fp8()
    cpu_s = time.perf_counter() - start
    assert offloaded.weight.device.type == "cpu" and offloaded.weight_scale.device.type == "cpu"

    def same(a: Linear, b: Linear) -> bool:
        return torch.equal(a.weight.cpu().view(torch.uint8), b.weight.cpu().view(torch.uint8)) and torch.equal(
            a.weight_scale.cpu(), b.weight_scale.cpu()
        )

    print(f"[{out_features}, {in_features}]: on the GPU from CPU memory {gpu_s * 1e3:.1f} ms, identical to the "
          f"in-memory model's: {same(offloaded, in_memory)}; on the CPU {cpu_s * 1e3:.1f} ms, identical: "
          f"{same(on_cpu, in_memory)}")  # fmt: skip
    assert same(offloaded, in_memory)
print("fp8 quantised on the GPU from CPU memory: identical to the in-memory model's")
