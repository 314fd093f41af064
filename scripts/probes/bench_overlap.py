"""Does an all-to-all hide behind a GEMM? (2+ CUDA GPUs of one host)

    torchrun --nproc-per-node 2 scripts/probes/bench_overlap.py

Times, by CUDA events (median of 20 rounds, every rank in step), FLUX.1-dev's single-block MLP GEMM
(4608 x 3072 @ 3072 x 12288, bf16) and the all-to-all Ulysses-2 sends for a block's q, k and v
(42 MB), alone, one after the other, and side by side on two streams: through NCCL (its kernels
take SMs from the GEMM) and as copy-engine writes into the peers' symmetric memory (no SMs for the
copy itself; two barrier kernels around it). Checks that both exchanges deliver the same tensor.
Leaves NVLink multicast off (TORCH_SYMM_MEM_DISABLE_MULTICAST=1)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: bench_common
from bench_common import join_nccl_group  # noqa: E402

ROUNDS = 20


def main() -> None:
    device = join_nccl_group()
    rank = dist.get_rank()
    world = dist.get_world_size()
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x, w = torch.randn(4608, 3072, **bf16), torch.randn(12288, 3072, **bf16)
    send = torch.randn(world, 2304 * 3 * 12 * 128, **bf16)  # [dest rank, S_loc*(q,k,v)*heads*D]
    received = torch.empty_like(send)  # [source rank, ...]
    inbox = symm_mem.empty(send.shape, dtype=send.dtype, device=device)  # [source rank, ...]
    handle = symm_mem.rendezvous(inbox, dist.group.WORLD)
    peer_inboxes = [handle.get_buffer(p, send.shape, send.dtype) for p in range(world)]
    side = torch.cuda.Stream(device)

    def gemm():
        return x @ w.t()

    def nccl_start():
        return dist.all_to_all_single(received, send, async_op=True)

    def copy_engine_start():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            handle.barrier(channel=0)  # every peer has read what it was last sent
            for p in range(world):
                peer_inboxes[p][rank].copy_(send[p])  # a DtoD memcpy into the peer's memory
            handle.barrier(channel=1)  # everything sent to me has arrived

    def copy_engine_wait():
        torch.cuda.current_stream().wait_stream(side)

    variants = {
        "GEMM alone": gemm,
        "NCCL all-to-all alone": lambda: nccl_start().wait(),
        "GEMM, then NCCL all-to-all": lambda: (gemm(), nccl_start().wait()),
        "NCCL all-to-all beside the GEMM": lambda: (lambda work: (gemm(), work.wait()))(nccl_start()),
        "copy-engine exchange alone": lambda: (copy_engine_start(), copy_engine_wait()),
        "copy-engine exchange beside the GEMM": lambda: (copy_engine_start(), gemm(), copy_engine_wait()),
    }
    for name, body in variants.items():
        us = gpu_us(body)
        if rank == 0:
            print(f"{name:40} {statistics.median(us):8.1f} us (min {min(us):.1f})", flush=True)

    copy_engine_start()
    copy_engine_wait()
    nccl_start().wait()
    torch.cuda.synchronize()
    if rank == 0:
        print(f"copy-engine exchange equals NCCL's all-to-all: {torch.equal(inbox, received)}")
    dist.destroy_process_group()


def gpu_us(body) -> list[float]:
    for _ in range(3):
        body()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    us = []
    for _ in range(ROUNDS):
        start.record()
        body()
        end.record()
        torch.cuda.synchronize()
        dist.barrier()
        us.append(start.elapsed_time(end) * 1e3)
    return us


if __name__ == "__main__":
    main()
