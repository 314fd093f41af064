"""Host-to-device copy rates from CPU memory pinned two ways (torch's pinned allocator; cudaHostRegister of a
torch.empty buffer, as sgdiff/offload/weights.py pin does), whole and as 151 MB views, with non_blocking."""

import time

import torch

from sgdiff.offload.weights import pin

SIZE = 4 * 2**30
PART = 151 * 2**20


def rate(name: str, src: torch.Tensor) -> None:
    dst = torch.empty(SIZE, dtype=torch.uint8, device="cuda")
    for label, parts in (
        ("whole", [slice(0, SIZE)]),
        ("views", [slice(i, min(i + PART, SIZE)) for i in range(0, SIZE, PART)]),
    ):
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for part in parts:
                dst[part].copy_(src[part], non_blocking=True)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        print(f"{name:28} {label:5} is_pinned={src[parts[0]].is_pinned()} {SIZE / seconds / 1e9:6.1f} GB/s", flush=True)
    # .to(device, non_blocking) of a bf16 view, as lora/fused.py base_weight does
    view = src[:PART].view(torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        view.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    print(f"{name:28} .to(cuda) of bf16 views {20 * PART / (time.perf_counter() - start) / 1e9:6.1f} GB/s", flush=True)


start = time.perf_counter()
allocated = torch.empty(SIZE, dtype=torch.uint8, pin_memory=True)
print(f"torch pinned allocator: {time.perf_counter() - start:.2f} s for {SIZE / 2**30:.0f} GiB")
rate("torch pin_memory=True", allocated)
start = time.perf_counter()
registered = torch.empty(SIZE, dtype=torch.uint8)
registered.fill_(1)
pin(registered)
print(f"empty + fill + cudaHostRegister: {time.perf_counter() - start:.2f} s")
rate("cudaHostRegister", registered)
pageable = torch.ones(SIZE, dtype=torch.uint8)
rate("pageable", pageable)
