"""What a cross-stream edge costs inside a replayed CUDA graph (1 CUDA GPU)

    python scripts/probes/bench_graph_edges.py

Ulysses through symmetric memory forks its copies onto a side stream and joins them back ~6 times per
attention. Captures 200 rounds of a ~2 us kernel: on one stream; moved to a side stream (a fork
before, a join after); two per round on one stream; one on each stream side by side. Prints the
median replay time per round (of 10 replays)."""

from __future__ import annotations

import torch

ROUNDS = 200


def main() -> None:
    x = torch.randn(1 << 20, device="cuda")
    y = torch.empty_like(x)
    side = torch.cuda.Stream()

    def kernel():
        torch.mul(x, 1.0001, out=y)

    def one_stream():
        for _ in range(ROUNDS):
            kernel()

    def two_per_round():
        for _ in range(ROUNDS):
            kernel()
            kernel()

    def on_side_stream(also_on_main: bool):
        main = torch.cuda.current_stream()
        for _ in range(ROUNDS):
            side.wait_stream(main)  # fork
            with torch.cuda.stream(side):
                kernel()
            if also_on_main:
                kernel()
            main.wait_stream(side)  # join

    def per_round(body) -> float:
        capture = torch.cuda.Stream()
        with torch.cuda.stream(capture):
            body()  # warm-up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=capture):
                body()
        for _ in range(3):
            graph.replay()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / ROUNDS)
        return sorted(times)[len(times) // 2]

    print(torch.cuda.get_device_name())
    for label, body in (
        ("1 kernel, one stream", one_stream),
        ("1 kernel on the side stream: fork + join", lambda: on_side_stream(False)),
        ("2 kernels, one stream", two_per_round),
        ("1 kernel on each stream side by side: fork + join", lambda: on_side_stream(True)),
    ):
        print(f"{label:52} {per_round(body):6.2f} us per round", flush=True)


if __name__ == "__main__":
    main()
