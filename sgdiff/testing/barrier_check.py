"""The symmetric-memory exchange's barrier kernel (kernels/triton_signal_barrier.py) in Triton's
interpreter, with forked processes as the ranks and shared host memory as their signal pads:
`TRITON_INTERPRET=1 python -m sgdiff.testing.barrier_check` (tests/test_kernels.py).

Every round each rank writes its round number into every rank's inbox, passes the barrier, and
checks that every rank's number has arrived; the last rank sleeps before it writes, so a barrier that
lets a rank through early is caught every time. A second barrier ends the round (as the exchange's
next barrier does) before anyone writes again."""

from __future__ import annotations

import multiprocessing
import os
import time

import torch

RANKS, ROUNDS = 3, 3


def rank_main(rank: int, table: torch.Tensor, inbox: torch.Tensor, early: torch.Tensor) -> None:
    from sgdiff.kernels.triton_signal_barrier import signal_barrier

    count = torch.zeros(1, dtype=torch.int32)
    for round_ in range(1, ROUNDS + 1):
        if rank == RANKS - 1:
            time.sleep(1.0)
        inbox[:, rank] = round_  # inbox[dst, src]
        signal_barrier(table, count, rank)
        early[rank] += int((inbox[rank] < round_).sum())
        signal_barrier(table, count, rank)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernel then runs on the CPU)")
    pads = torch.zeros(RANKS, RANKS, dtype=torch.int32).share_memory_()  # rank r's pad: pads[r]
    table = torch.tensor([pads[r].data_ptr() for r in range(RANKS)], dtype=torch.int64)  # same address after fork
    inbox = torch.zeros(RANKS, RANKS, dtype=torch.int64).share_memory_()
    early = torch.zeros(RANKS, dtype=torch.int64).share_memory_()
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=rank_main, args=(r, table, inbox, early)) for r in range(RANKS)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    print(f"exit codes {[p.exitcode for p in ranks]}; values seen before they arrived {early.tolist()}")
    print(f"pads {pads.tolist()}")


if __name__ == "__main__":
    main()
