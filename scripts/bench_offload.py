"""`--cpu-offload layers` at full size (issue 30's memory-cap targets) on one GPU: sgdiff's transformer (random
bf16 weights, the speed toggles `sgdiff generate` picks by default) first in GPU memory, then with its repeated
blocks in pinned CPU memory, streamed onto the GPU while the block before them computes, the process capped
(`--gpu-memory-limit`, as `sgdiff generate` caps it) and `--offload-resident-blocks` keeping what fits.

Measured: a denoising step (the model's forwards per step: two with CFG, on the prompt's and the negative
prompt's inputs) in memory and offloaded, medians of --repeat, and their ratio (the target: <= 1.3x for
Wan2.1-14B 1280x720x81 under 24 GiB); peak GPU memory of a step each way (what the cap must hold); blocks kept
and copied a step; whether the offloaded forward's output equals the in-memory one bit for bit (it must: the
same bytes, at the same alignment, run the same kernels). Wan2.2-T2V-A14B's experts are each a transformer of
Wan2.1-14B's shape, one of them running a step: its step under a cap is this one's (the other expert streams
the same way once the boundary step passes).

    python scripts/bench_offload.py --model wan2.1-t2v-14b --height 720 --width 1280 --gpu-memory-limit 24GiB
    python scripts/bench_offload.py --tiny --device cpu --warmup 1 --repeat 2  # checks the script on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdiff.bench.parts import BENCH_MODELS, TINY_SIZE, build_transformers, transformer_inputs  # noqa: E402
from sgdiff.bench.run import denoising_step, seconds_of, synchronize  # noqa: E402
from sgdiff.config import OffloadConfig, SpeedConfig  # noqa: E402
from sgdiff.engine.memory import cap_gpu_memory, check_gpu_memory_limit, parse_size  # noqa: E402
from sgdiff.errors import UserError  # noqa: E402
from sgdiff.models.attention import use_attention_impl  # noqa: E402
from sgdiff.offload.apply import check_offload, stream_blocks  # noqa: E402
from sgdiff.pipeline.registry import family_named  # noqa: E402
from sgdiff.speed.apply import check_speed, resolve_speed, speed_up_transformer  # noqa: E402

TARGET = 1.3  # offloaded step / in-memory step (issue 30, Wan 14B under 24 GiB and A14B under 32 GiB)


def timed_steps(step, device: torch.device, warmup: int, repeat: int) -> dict[str, Any]:
    first = seconds_of(step, device)
    for _ in range(warmup):
        step()
    ms = [seconds_of(step, device) * 1e3 for _ in range(repeat)]
    return {"first_step_s": first, "median_ms": statistics.median(ms), "ms": ms}


def peak_gib(step, device: torch.device) -> float | None:
    """Runs one step; the most GPU memory it held (None on the CPU)."""
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    if device.type != "cuda" and not args.tiny:
        raise UserError("full-size models need a CUDA GPU; --tiny checks the script on a CPU")
    if args.model not in BENCH_MODELS:
        raise UserError(f"--model {args.model!r} is not one of: {', '.join(BENCH_MODELS)}")
    limit = None if args.gpu_memory_limit is None else parse_size(args.gpu_memory_limit, "gpu_memory_limit")
    check_gpu_memory_limit(device, limit)
    kept = args.resident_blocks if args.resident_blocks == "auto" else int(args.resident_blocks)
    offload = OffloadConfig(cpu_offload="layers", offload_prefetch=args.prefetch, offload_resident_blocks=kept)
    speed = resolve_speed(SpeedConfig(), device, torch.bfloat16)  # `sgdiff generate`'s defaults on this device
    check_offload(offload, speed)
    attention = check_speed(speed, device, torch.bfloat16)
    model = BENCH_MODELS[args.model]
    size = dict(TINY_SIZE) if args.tiny else dict(height=model.height, width=model.width, frames=model.frames)
    size |= {key: getattr(args, key) for key in ("height", "width") if getattr(args, key) is not None}

    reference, ours = build_transformers(model, args.tiny, device)
    del reference  # (sgdiff's transformer holds the same tensors: one model in memory)
    speed_up_transformer(ours, speed, family_named(model.family))
    cond = transformer_inputs(model, ours, size, device, seed=1)
    uncond = {**cond, "encoder_hidden_states": transformer_inputs(model, ours, size, device, seed=2)[
        "encoder_hidden_states"]}  # fmt: skip

    def forward(inputs: dict) -> torch.Tensor:
        with torch.inference_mode(), use_attention_impl(attention):
            return ours(**inputs)

    step = denoising_step(model, forward, cond, uncond)
    result: dict[str, Any] = {"model": model.name, "size": size, "tiny": args.tiny,
                              "forwards_per_step": model.forwards_per_step}  # fmt: skip
    result["in_memory"] = timed_steps(step, device, args.warmup, args.repeat)
    result["in_memory"]["peak_gib"] = peak_gib(step, device)
    expected = forward(cond).clone()

    streamer = stream_blocks([ours], offload, device, limit)  # the blocks move to pinned CPU memory
    assert streamer is not None, f"{model.name}'s transformer has no repeated blocks to stream"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        cap_gpu_memory(device, limit)
    # one stage: the first step's first forward runs every block streamed, then `auto` decides what stays
    offloaded = timed_steps(step, device, args.warmup, args.repeat)
    copies_before, waits_before = streamer.copies, streamer.waits
    offloaded["peak_gib"] = peak_gib(step, device)  # (a step once the keeping is decided: its copies counted)
    offloaded |= {
        "blocks": len(streamer.units),
        "blocks_kept": streamer.kept,
        "block_gib": max(unit.nbytes for unit in streamer.units) / 2**30,
        "blocks_copied_per_step": streamer.copies - copies_before,
        "blocks_not_prefetched_per_step": streamer.waits - waits_before,
    }
    result["offloaded"] = offloaded
    result["identical"] = bool(torch.equal(forward(cond), expected))
    streamer.release()
    result["ratio"] = offloaded["median_ms"] / result["in_memory"]["median_ms"]
    result["offload"] = {"prefetch": args.prefetch, "resident_blocks": args.resident_blocks,
                         "gpu_memory_limit": args.gpu_memory_limit}  # fmt: skip
    result["card"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["torch"] = torch.__version__
    return result


def render(result: dict[str, Any]) -> str:
    size, mem, off = result["size"], result["in_memory"], result["offloaded"]
    frames = f"x{size['frames']}" if BENCH_MODELS[result["model"]].frames else ""
    cap = result["offload"]["gpu_memory_limit"] or "no cap"
    peak = lambda gib: "" if gib is None else f", peak GPU memory {gib:.1f} GiB"  # noqa: E731
    lines = [
        f"{result['model']} {size['width']}x{size['height']}{frames}{' (TINY)' * result['tiny']}; {result['card']}, "
        f"torch {result['torch']}; a step = {result['forwards_per_step']} forward(s)",
        f"in device memory:    step {mem['median_ms']:10.1f} ms (first {mem['first_step_s']:.1f} s)"
        f"{peak(mem['peak_gib'])}",
        f"--cpu-offload layers, {cap}, prefetch {result['offload']['prefetch']}, resident blocks "
        f"{result['offload']['resident_blocks']}: step {off['median_ms']:10.1f} ms (first {off['first_step_s']:.1f} s)"
        f"{peak(off['peak_gib'])}",
        f"blocks: {off['blocks']} of {off['block_gib']:.2f} GiB, {off['blocks_kept']} kept on the device, "
        f"{off['blocks_copied_per_step']} copied a step, {off['blocks_not_prefetched_per_step']} of them not "
        "prefetched in time",
        f"offloaded / in memory: {result['ratio']:.2f}x"
        + ("" if result["tiny"] else f" (target <= {TARGET}x: {'met' if result['ratio'] <= TARGET else 'missed'})")
        + f"; output identical to the in-memory one: {'yes' if result['identical'] else 'NO'}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="A step in GPU memory against --cpu-offload layers under a cap")
    parser.add_argument("--model", default="wan2.1-t2v-14b", help=f"one of {', '.join(BENCH_MODELS)}")
    parser.add_argument("--height", type=int, help="output height instead of the model's")
    parser.add_argument("--width", type=int, help="output width instead of the model's")
    parser.add_argument("--gpu-memory-limit", help="the cap the offloaded steps run under, e.g. 24GiB (CUDA)")
    parser.add_argument("--prefetch", type=int, default=1, help="blocks copied ahead of the one computing")
    parser.add_argument("--resident-blocks", default="auto", help="auto, or how many blocks stay on the GPU")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (timed apart), each way")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps each way (the median is reported)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model: checks the script on a CPU")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    try:
        if args.repeat < 1 or args.warmup < 0:
            raise UserError("--repeat must be at least 1, --warmup at least 0")
        if args.resident_blocks != "auto" and not args.resident_blocks.isdigit():
            raise UserError(f"--resident-blocks must be auto or a count, got {args.resident_blocks!r}")
        result = run(args)
    except UserError as error:
        sys.exit(f"error: {error}")
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
