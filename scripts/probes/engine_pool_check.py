"""On one GPU: the engine's worker pool (one spawned process: its NCCL group and gloo control
channel) against the in-process engine, on the embedded demo model: the same pixels, requests in a
row on one worker, a cancel; plain and with torch.compile + CUDA graphs in the worker.

    python scripts/probes/engine_pool_check.py

On several GPUs `sgdiff generate --num-gpus N` runs the same pool with N workers."""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sgdiff.config import EngineConfig, ParallelConfig, RuntimeConfig, SpeedConfig
from sgdiff.engine.pool import WorkerPool
from sgdiff.engine.service import Engine
from sgdiff.pipeline.base import NullEvents

PROMPTS = ["a red circle on a blue background", "a small white triangle on the right on a blue background"]


def main():
    for speed in (SpeedConfig(), SpeedConfig(fused_norms=True, torch_compile=True, cuda_graph=True)):
        runtime = RuntimeConfig(device="cuda", speed=speed)
        with Engine("sgdiff/demo-image", runtime=runtime) as local:
            params = [local.request(p, seed=i) for i, p in enumerate(PROMPTS)]
            expected = [local.submit(p).result().images for p in params]
        pool = WorkerPool(EngineConfig("sgdiff/demo-image", runtime=runtime, parallel=ParallelConfig(1)), NullEvents())
        start = time.perf_counter()
        pool.start()
        print(
            f"pool of 1 on {torch.cuda.get_device_name()} started in {time.perf_counter() - start:.1f} s, speed {speed}"
        )
        pid = pool.workers[0].pid
        try:
            for round_ in range(2):
                handles = [pool.dispatcher.submit(p) for p in params]
                diffs = [
                    int(np.abs(h.result(60).images.astype(int) - e).max())
                    for h, e in zip(handles, expected, strict=True)
                ]
                print(f"round {round_}: max pixel difference against the in-process engine {diffs}")
            long = pool.dispatcher.submit(local.request(PROMPTS[0], num_inference_steps=500))
            for event in long.events():
                if event.step and event.step[0] == 5:
                    long.cancel()
            print(
                f"cancel at step 5 of 500: {long.status.value} after {long.progress[0]} steps; "
                f"same worker: {pool.workers[0].pid == pid}"
            )
            again = pool.dispatcher.submit(params[0]).result(60).images
            print("after the cancel: max pixel difference", int(np.abs(again.astype(int) - expected[0]).max()))
        finally:
            pool.close()
        print("worker exit code", pool.workers[0].exitcode)


if __name__ == "__main__":
    main()
