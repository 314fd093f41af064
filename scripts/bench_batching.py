"""Throughput of dynamic request batching: C requests submitted at once (different prompts and seeds,
the same size and steps) to an engine with batching off, then to one with max_batch_size C; prints
requests/s of both and their ratio.

    python scripts/bench_batching.py [--model-path sgdiff/demo-image] [--device cpu] [--concurrency 8]
                                     [--steps N] [--delay-ms 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdiff.config import BatchingConfig, RuntimeConfig  # noqa: E402
from sgdiff.engine.service import Engine  # noqa: E402

PROMPTS = [
    "a red circle on a blue background",
    "a small white triangle on the right on a blue background",
    "a green square on a black background",
    "a yellow circle on the left on a white background",
]


def requests_per_second(engine: Engine, params: list, repeat: int) -> tuple[float, list[int]]:
    """The median over `repeat` rounds of: every request submitted at once, until the last is done."""
    engine.submit(params[0]).result()  # warm up (first-call allocations, compile if asked)
    rates, sizes = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        results = [handle.result() for handle in [engine.submit(p) for p in params]]
        rates.append(len(params) / (time.perf_counter() - start))
        sizes = [result.batch_size for result in results]
    return statistics.median(rates), sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="sgdiff/demo-image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--concurrency", type=int, default=8, help="requests submitted at once")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per request (preset's)")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="batching delay")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    runtime = RuntimeConfig(device=args.device, dtype=args.dtype)
    rates = {}
    for name, batching in (
        ("off", BatchingConfig()),
        ("on", BatchingConfig(args.concurrency, args.delay_ms)),
    ):
        with Engine(args.model_path, runtime=runtime, batching=batching) as engine:
            engine.start()
            params = [
                engine.request(PROMPTS[i % len(PROMPTS)], seed=i, num_inference_steps=args.steps)
                for i in range(args.concurrency)
            ]
            rates[name], sizes = requests_per_second(engine, params, args.repeat)
            device = str(engine.runner.device)
        print(f"batching {name:3}: {rates[name]:7.2f} requests/s (batch sizes {sizes})")
    print(
        f"{args.model_path} on {device}, {args.concurrency} requests at once: "
        f"batching gives {rates['on'] / rates['off']:.2f}x the throughput"
    )


if __name__ == "__main__":
    main()
