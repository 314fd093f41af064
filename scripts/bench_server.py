"""What a client of `sgdiff serve` waits for, measured as the client sees it (HTTP, one persistent
connection per client thread):

- server A, no batching (the default): one request's latency against the engine's own generation
  time for it; throughput one request at a time, and with C clients at once;
- server B, --max-batch-size C: a burst of C requests (one batch: its engine time against C single
  requests), then throughput with C clients at once.

    python scripts/bench_server.py                                   # the demo image model on the CPU
    python scripts/bench_server.py --model-path /ckpt/flux-dev --device cuda --size 1024x1024 \
        --steps 28 --concurrency 4 --requests 8 --serve-arg=--enable-fused-projections

Prints a table; --json writes the numbers."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from sgdiff.testing.server import ServerProcess

clients = threading.local()


def one(url: str, prompt: str, seed: int, args) -> dict:
    if not hasattr(clients, "http"):
        clients.http = httpx.Client(timeout=3600)
    body = {"prompt": prompt, "seed": seed, "size": args.size, "num_inference_steps": args.steps}
    start = time.perf_counter()
    response = clients.http.post(f"{url}/v1/images/generations", json=body)
    wall = time.perf_counter() - start
    response.raise_for_status()
    extras = response.json()["sgdiff"]
    return {"wall": wall, "generation": extras["generation_seconds"], "encode": extras["encode_seconds"],
            "server": extras["server_seconds"], "batch": extras["batch_size"]}  # fmt: skip


def run(url: str, count: int, concurrency: int, args, first_seed: int) -> tuple[float, list[dict]]:
    """`count` requests from `concurrency` clients: (requests per second, each one's numbers)."""
    prompts = [(f"a photo of object number {i}", first_seed + i) for i in range(count)]
    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        answers = list(pool.map(lambda ps: one(url, *ps, args), prompts))
    return count / (time.perf_counter() - start), answers


def server(server_args: list[str], args, folder: Path, batch: int) -> ServerProcess:
    batching = ["--max-batch-size", str(batch), "--batching-delay-ms", str(args.delay), "--max-queue", "256"]
    return ServerProcess([*server_args, *batching], folder / "state", folder / "log.txt", device=args.device)


def mean(answers: list[dict], key: str) -> float:
    return statistics.mean(a[key] for a in answers)


def measure(server_args: list[str], args, folder: Path) -> dict:
    c, numbers = args.concurrency, {}
    with server(server_args, args, folder / "a", batch=1) as a:
        run(a.url, 2, 1, args, 1000)  # warm: first-call costs (allocator, kernels' plans) are not the server's
        _, alone = run(a.url, args.latency_requests, 1, args, 2000)
        numbers.update({f"latency_{key}": mean(alone, key) for key in ("wall", "generation", "encode", "server")})
        numbers["one_at_a_time"], _ = run(a.url, args.requests, 1, args, 3000)
        numbers["unbatched_concurrent"], _ = run(a.url, args.requests, c, args, 4000)
    with server(server_args, args, folder / "b", batch=c) as b:
        run(b.url, c, c, args, 5000)  # warm the batched shapes
        _, burst = run(b.url, c, c, args, 6000)
        numbers["burst_batch_sizes"] = sorted({x["batch"] for x in burst})
        numbers["burst_generation"] = max(x["generation"] for x in burst)
        numbers["batched_concurrent"], answers = run(b.url, args.requests, c, args, 7000)
        numbers["batch_sizes"] = [x["batch"] for x in answers]
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
    parser.add_argument("--delay", type=float, default=50.0, help="--batching-delay-ms of server B")
    parser.add_argument("--serve-arg", action="append", default=[], help="passed on to sgdiff serve (repeat)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n = measure(["--model-path", args.model_path, *args.serve_arg], args, Path(tmp))
    c = args.concurrency
    rows = [
        ("A: one request, client wall (s)", f"{n['latency_wall']:.3f}"),
        ("A: the engine's generation time for it (s)", f"{n['latency_generation']:.3f}"),
        ("A: of which PNG encoding / in the server (s)", f"{n['latency_encode']:.3f} / {n['latency_server']:.3f}"),
        ("A: latency over generation", f"{n['latency_wall'] / n['latency_generation']:.3f}"),
        ("A: throughput one at a time (req/s)", f"{n['one_at_a_time']:.3f}"),
        (f"A: throughput, {c} clients, no batching (req/s)", f"{n['unbatched_concurrent']:.3f}"),
        (f"B: a burst of {c}: batch sizes, engine time (s)", f"{n['burst_batch_sizes']} {n['burst_generation']:.3f}"),
        (f"B: {c} in one batch over {c} alone (engine time)",
         f"{c * n['latency_generation'] / n['burst_generation']:.2f}x"),
        (f"B: throughput, {c} clients, batching (req/s)", f"{n['batched_concurrent']:.3f}"),
        ("B: batch sizes seen", " ".join(map(str, n["batch_sizes"]))),
        ("B batched over A one at a time", f"{n['batched_concurrent'] / n['one_at_a_time']:.2f}x"),
        (f"B batched over A at {c} clients", f"{n['batched_concurrent'] / n['unbatched_concurrent']:.2f}x"),
    ]  # fmt: skip
    print(f"\n{args.model_path} {args.size} {args.steps} steps on {args.device}, {args.requests} requests")
    for name, value in rows:
        print(f"  {name:<52} {value}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **n}, indent=2))


if __name__ == "__main__":
    main()
