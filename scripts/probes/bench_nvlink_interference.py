"""Does NVLink traffic slow the compute beside it? (2 CUDA GPUs of one host)

    torchrun --nproc-per-node 2 scripts/probes/bench_nvlink_interference.py

Rank 0 times, by CUDA events (median of 5 rounds), 100 cuDNN attentions of FLUX.1-dev Ulysses-2's
size (4608 tokens, 12 heads, D 128) and 50 GEMMs of its q/k/v projection (2304 x 9216 x 3072, bf16),
while 28 MB copies stream over NVLink for longer than the compute takes: none; the peer writing into
rank 0's memory (symmetric memory) by copy engine (a contiguous memcpy: no SMs) or by an SM kernel;
rank 0 itself writing into the peer's memory on a side stream, either way; both directions by copy
engine. Then the rate of each kind of copy alone. Leaves NVLink multicast off."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: bench_common
from bench_common import join_nccl_group, time_call  # noqa: E402

ELEMENTS = 14 * 2**20  # bf16: 28 MB, what one FLUX Ulysses-2 attention sends to the peer


def main() -> None:
    device = join_nccl_group()
    rank = dist.get_rank()
    bf16 = dict(device=device, dtype=torch.bfloat16)
    q, k, v = (torch.randn(1, 12, 4608, 128, **bf16) for _ in range(3))  # [B, H, S, D]
    a, w = torch.randn(2304, 3072, **bf16), torch.randn(9216, 3072, **bf16)
    inbox = symm_mem.empty(ELEMENTS, dtype=torch.bfloat16, device=device)
    handle = symm_mem.rendezvous(inbox, dist.group.WORLD)
    peer = handle.get_buffer(1 - rank, (ELEMENTS,), torch.bfloat16)
    src = torch.randn(ELEMENTS, **bf16)
    side = torch.cuda.Stream(device)

    def attentions():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for _ in range(100):
                F.scaled_dot_product_attention(q, k, v)

    def gemms():
        for _ in range(50):
            torch.mm(a, w.t())

    def push(engine: str, times: int) -> None:
        with torch.cuda.stream(side):
            for _ in range(times):
                if engine == "copy engine":
                    peer.copy_(src)  # contiguous, same dtype: a memcpy
                else:
                    torch.mul(src, 1, out=peer)  # an elementwise kernel storing over NVLink

    def timed(label: str, body, pushers: dict[int, str]) -> None:
        body()
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            dist.barrier()
            if rank in pushers:
                push(pushers[rank], 300)  # ~25 ms of traffic: outlasts the compute
            if rank == 0:
                times.append(time_call(body))
            torch.cuda.synchronize()
        if rank == 0:
            print(f"{label:66} {statistics.median(times):7.2f} ms", flush=True)

    if rank == 0:
        print(torch.cuda.get_device_name(device))
    for label, body in (("100 attentions", attentions), ("50 GEMMs", gemms)):
        timed(f"{label}, no traffic", body, {})
        for engine in ("copy engine", "SM kernel"):
            timed(f"{label}, the peer writes into my memory by {engine}", body, {1: engine})
            timed(f"{label}, I write into the peer's by {engine}", body, {0: engine})
        timed(f"{label}, both directions by copy engine", body, {0: "copy engine", 1: "copy engine"})
    for engine in ("copy engine", "SM kernel"):
        torch.cuda.synchronize()
        dist.barrier()
        with torch.cuda.stream(side):
            ms = time_call(lambda engine=engine: push(engine, 50))
        if rank == 0:
            rate = 50 * src.nbytes / (ms / 1e3) / 1e9
            print(f"writes into the peer by {engine}, both ranks at once: {rate:.0f} GB/s each", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
