"""What a client of `sgdiff serve` waits for: one request's latency against the engine's own
generation time for it, and throughput one request at a time against C at once (batched by the
server, and optionally against a second server that does not batch).

    python scripts/bench_server.py                                   # the demo image model on the CPU
    python scripts/bench_server.py --model-path /ckpt/flux-dev --device cuda --size 1024x1024 \
        --steps 28 --concurrency 4 --requests 8 --serve-arg=--enable-fused-projections

Prints a table; --json writes the numbers."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from sgdiff.testing.server import ServerProcess


def one(url: str, prompt: str, seed: int, args) -> dict:
    body = {"prompt": prompt, "seed": seed, "size": args.size, "num_inference_steps": args.steps}
    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=3600)
    wall = time.perf_counter() - start
    response.raise_for_status()
    extras = response.json()["sgdiff"]
    return {"wall": wall, "generation": extras["generation_seconds"], "batch": extras["batch_size"]}


def run(url: str, count: int, concurrency: int, args, first_seed: int) -> tuple[float, list[dict]]:
    """`count` requests, `concurrency` at a time: (requests per second, each one's numbers)."""
    prompts = [(f"a photo of object number {i}", first_seed + i) for i in range(count)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda ps: one(url, *ps, args), prompts))
    return count / (time.perf_counter() - start), answers


def measure(server_args: list[str], args, folder: Path, batched: bool) -> dict:
    batching = ["--max-batch-size", str(args.concurrency if batched else 1), "--batching-delay-ms", str(args.delay)]
    with ServerProcess([*server_args, *batching, "--max-queue", "256"], folder / "state", folder / "log.txt",
                       device=args.device) as server:  # fmt: skip
        run(server.url, 2, 1, args, 1000)  # warm: first-call costs (compiling, allocator) are not the server's
        run(server.url, args.concurrency, args.concurrency, args, 2000)
        numbers = {}
        if batched:
            _, alone = run(server.url, args.latency_requests, 1, args, 3000)
            numbers["latency_wall"] = statistics.mean(a["wall"] for a in alone)
            numbers["latency_generation"] = statistics.mean(a["generation"] for a in alone)
            numbers["one_at_a_time"], _ = run(server.url, args.requests, 1, args, 4000)
        numbers["concurrent"], answers = run(server.url, args.requests, args.concurrency, args, 5000)
        numbers["batch_sizes"] = sorted({a["batch"] for a in answers})
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="sgdiff/demo-image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-requests", type=int, default=3)
    parser.add_argument("--delay", type=float, default=20.0, help="--batching-delay-ms")
    parser.add_argument("--compare-unbatched", action="store_true", help="also a server without batching, at C")
    parser.add_argument("--serve-arg", action="append", default=[], help="passed on to sgdiff serve (repeat)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server_args = ["--model-path", args.model_path, *args.serve_arg]
    with tempfile.TemporaryDirectory() as tmp:
        batched = measure(server_args, args, Path(tmp) / "batched", batched=True)
        unbatched = (
            measure(server_args, args, Path(tmp) / "unbatched", batched=False) if args.compare_unbatched else None
        )
    c = args.concurrency
    rows = [
        ("latency of one request, client wall (s)", f"{batched['latency_wall']:.3f}"),
        ("the engine's generation time for it (s)", f"{batched['latency_generation']:.3f}"),
        ("latency over generation", f"{batched['latency_wall'] / batched['latency_generation']:.3f}"),
        ("throughput one at a time (req/s)", f"{batched['one_at_a_time']:.3f}"),
        (f"throughput at {c}, batching up to {c} (req/s)", f"{batched['concurrent']:.3f} {batched['batch_sizes']}"),
        (f"batched at {c} over one at a time", f"{batched['concurrent'] / batched['one_at_a_time']:.2f}x"),
    ]  # fmt: skip
    if unbatched:
        rows += [
            (f"throughput at {c}, no batching (req/s)", f"{unbatched['concurrent']:.3f}"),
            (f"batched at {c} over unbatched at {c}", f"{batched['concurrent'] / unbatched['concurrent']:.2f}x"),
        ]
    print(f"\n{args.model_path} {args.size} {args.steps} steps on {args.device}, {args.requests} requests")
    for name, value in rows:
        print(f"  {name:<48} {value}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "batched": batched,
                                         "unbatched": unbatched}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
