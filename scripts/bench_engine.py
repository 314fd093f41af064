"""What the engine adds to a request, and how fast a cancel frees the GPU, on one loaded model:

- a request through the engine (submit -> thread -> handle.result()) against the same model's
  ModelRunner.generate called directly in the caller's thread, requests taking turns;
- a long request cancelled after its step 5: how many steps ran after the cancel, and how long
  the handle took to say cancelled, in seconds and in steps.

    python scripts/bench_engine.py [--model-path PATH] [--device cuda] [--repeat 10] [speed flags]

The speed flags are SpeedConfig's names (--torch-compile, --cuda-graph, ...), applied as
`sgdiff generate` applies them (the serving thread compiles and captures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdiff.config import RuntimeConfig, SpeedConfig  # noqa: E402
from sgdiff.engine.service import Engine  # noqa: E402


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="sgdiff/demo-image")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per timed request (preset's)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cancel-steps", type=int, default=200, help="steps of the request that is cancelled")
    toggles = [f.name for f in fields(SpeedConfig) if f.type in (bool, "bool")]
    for name in toggles:
        parser.add_argument("--" + name.replace("_", "-"), action="store_true")
    args = parser.parse_args()
    speed = SpeedConfig(**{name: getattr(args, name) for name in toggles})

    load = time.perf_counter()
    with Engine(args.model_path, runtime=RuntimeConfig(device=args.device, speed=speed)) as engine:
        engine.start()
        load = time.perf_counter() - load
        params = engine.request(args.prompt, num_inference_steps=args.steps)
        first = seconds(lambda: engine.submit(params).result())  # compiles and captures, if asked
        engine.runner.generate(params)  # warm both paths
        direct, served = [], []
        for _ in range(args.repeat):
            direct.append(seconds(lambda: engine.runner.generate(params)))
            served.append(seconds(lambda: engine.submit(params).result()))

        long = engine.request(args.prompt, num_inference_steps=args.cancel_steps)
        handle = engine.submit(long)
        step_times, cancelled_at, seen = [], None, 0
        for event in handle.events():
            if event.step:
                seen = event.step[0]
                step_times.append(event.args[2])
                if seen == 5:
                    handle.cancel()
                    cancelled_at = time.perf_counter()
        handle.wait()
        cancel_s = time.perf_counter() - cancelled_at
        step_s = statistics.median(step_times)
        device = str(engine.runner.device)
        if engine.runner.device.type == "cuda":
            import torch

            device = torch.cuda.get_device_name(engine.runner.device)

    direct_ms, served_ms = statistics.median(direct) * 1e3, statistics.median(served) * 1e3
    print(f"\n{args.model_path} on {device}, speed {speed}")
    print(f"| load s | first request s | direct ms | engine ms | engine - direct ms | {args.repeat} each")
    print(f"| {load:.1f} | {first:.2f} | {direct_ms:.1f} | {served_ms:.1f} | {served_ms - direct_ms:+.1f} |")
    print(
        f"cancel after step 5 of {args.cancel_steps}: status {handle.status.value}, {seen} steps reported, "
        f"{cancel_s * 1e3:.0f} ms from cancel() to the handle's answer "
        f"({cancel_s / step_s:.1f} steps of {step_s * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
