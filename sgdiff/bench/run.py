"""One `sgdiff bench` run: sgdiff and diffusers on the same weights, inputs and GPU, timed in turns.

Measured: one transformer forward and one denoising step (Wan: CFG's two forwards and the guided
combination), the text encoding and the VAE decode (the same transformers/diffusers modules in both
pipelines, so timed once), the end to end time as their sum over the preset's steps, peak GPU
memory of a forward and the transformer's weights, FLOPs of a forward (counted by
torch.utils.flop_counter), achieved TFLOP/s and its share of the card's bf16 matrix-multiply rate
(measured in the same run), and the agreement of the two transformers' outputs: both bf16, or with
--dit-precision fp8 sgdiff's FP8 weights against diffusers' bf16 (then it measures the FP8 error)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from sgdiff.bench.parts import (
    BENCH_MODELS,
    TINY_SIZE,
    BenchModel,
    build_decode,
    build_text_encoding,
    build_transformers,
    transformer_inputs,
)
from sgdiff.config import SpeedConfig
from sgdiff.engine.memory import cap_gpu_memory, parse_size
from sgdiff.errors import UserError
from sgdiff.models.attention import sdpa_attention, use_attention_impl
from sgdiff.pipeline.registry import family_named
from sgdiff.pipeline.stages.denoising import guided_velocity
from sgdiff.speed.apply import check_speed, resolve_speed, speed_up_transformer
from sgdiff.speed.attention_backends import attention_backend
from sgdiff.testing.compare import relative_error

CFG_SCALE = 5.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(variants: dict[str, Callable], device: torch.device, warmup: int, repeat: int) -> dict:
    """Every timed call's ms for each variant, timed in rounds so clock and thermal drift hit all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            times[name].append(seconds_of(fn, device) * 1e3)
    return times


def interleaved_ms(variants: dict[str, Callable], device: torch.device, warmup: int, repeat: int) -> dict[str, float]:
    """Median ms of each variant (interleaved_times)."""
    times = interleaved_times(variants, device, warmup, repeat)
    return {name: statistics.median(t) for name, t in times.items()}


def denoising_step(model: BenchModel, forward: Callable, cond: dict, uncond: dict) -> Callable[[], Any]:
    """One denoising step as the bench times it: `forward(cond)`, or with CFG the two forwards and their guided
    combination."""
    if model.forwards_per_step == 1:
        return lambda: forward(cond)
    guide = model.guide or guided_velocity  # (Edit: over the input image's tokens too, a few MB more)
    return lambda: guide(forward(cond), forward(uncond), CFG_SCALE)


def matmul_tflops(device: torch.device) -> float | None:
    """The card's bf16 matrix-multiply rate, measured (8192^3, median of 10); None on the CPU."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = interleaved_ms({"mm": lambda: a @ b}, device, 3, 10)["mm"]
    return 2 * 8192**3 / (ms / 1e3) / 1e12


def weight_gib(model: torch.nn.Module) -> float:
    """What a model's parameters and buffers take, GiB (FP8 weights: their float8 bytes and scales)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # each once (fused: views of one)
                for t in (*model.parameters(), *model.buffers())}  # fmt: skip
    return sum(storages.values()) / 2**30


def peak_memory_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def run_bench(
    name: str,
    speed: SpeedConfig,
    tiny: bool = False,
    warmup: int = 2,
    repeat: int = 5,
    height: int | None = None,
    width: int | None = None,
    gpu_memory_limit: str | None = None,
) -> dict[str, Any]:
    """`height`, `width`: the output's size instead of the model's preset size (Edit: its input image's too).
    `gpu_memory_limit`: a size (24GiB) this process may allocate on the GPU, both implementations together."""
    if name not in BENCH_MODELS:
        raise UserError(f"--model {name!r} is not one of: {', '.join(BENCH_MODELS)}")
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % 16):
            raise UserError(f"{flag} must be a positive multiple of 16, got {value}")
    model = BENCH_MODELS[name]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and not tiny:
        raise UserError("sgdiff bench builds full-size models and needs a CUDA GPU; --tiny checks it on a CPU")
    limit = None if gpu_memory_limit is None else parse_size(gpu_memory_limit, "gpu_memory_limit")
    cap_gpu_memory(device, limit)
    speed = resolve_speed(speed, device, torch.bfloat16)  # the defaults `sgdiff generate` would choose
    attention = check_speed(speed, device, torch.bfloat16)
    size = dict(TINY_SIZE) if tiny else dict(height=model.height, width=model.width, frames=model.frames)
    size |= {key: value for key, value in (("height", height), ("width", width)) if value is not None}
    peak_tflops = matmul_tflops(device)
    reference, ours = build_transformers(model, tiny, device)
    cond = transformer_inputs(model, ours, size, device, seed=1)
    negative = transformer_inputs(model, ours, size, device, seed=2)["encoder_hidden_states"]
    uncond = {**cond, "encoder_hidden_states": negative}

    def diffusers_forward(inputs=cond):
        return reference(**inputs, return_dict=False)[0]

    def sgdiff_forward(inputs=cond):
        with use_attention_impl(attention):
            return ours(**inputs)

    result: dict[str, Any] = {"model": name, "size": size, "steps": model.steps, "tiny": tiny,
                              "input_images": model.input_images}  # fmt: skip
    with torch.inference_mode():
        expected = diffusers_forward()
        # SDPA's kernels, whose FLOPs the counter knows (FlashAttention's it cannot see; math would not fit a GPU)
        counting = sdpa_attention if device.type == "cuda" else attention_backend("math", device, torch.bfloat16)
        with FlopCounterMode(display=False) as counter, use_attention_impl(counting):
            ours(**cond)  # eager, before any toggle: every matmul and attention visible
        result["tflop_per_forward"] = counter.get_total_flops() / 1e12
        speed_up_transformer(ours, speed, family_named(model.family))
        result["sgdiff_first_forward_s"] = seconds_of(sgdiff_forward, device)  # compile / capture
        result["bf16_rel_err"] = relative_error(sgdiff_forward(), expected)
        forward_ms = interleaved_ms({"diffusers": diffusers_forward, "sgdiff": sgdiff_forward}, device, warmup, repeat)
        step_ms = forward_ms
        if model.forwards_per_step > 1:
            variants = {impl: denoising_step(model, fn, cond, uncond)
                        for impl, fn in (("diffusers", diffusers_forward), ("sgdiff", sgdiff_forward))}  # fmt: skip
            step_ms = interleaved_ms(variants, device, warmup, repeat)
        memory = {impl: peak_memory_gib(fn, device) for impl, fn in (("diffusers", diffusers_forward),
                                                                     ("sgdiff", sgdiff_forward))}  # fmt: skip
        weights = {"diffusers": weight_gib(reference), "sgdiff": weight_gib(ours)}
        # free the transformers before the text encoders load (Qwen-Image: 41 GB, then 17 GB; qwen_parts.py)
        reference = ours = None  # type: ignore[assignment]
        encoders = build_text_encoding(model, tiny, device)
        text_ms = interleaved_ms(encoders, device, 1, max(repeat // 2, 1))
        text_s = {impl: text_ms.get(impl, text_ms["diffusers"]) / 1e3 for impl in ("diffusers", "sgdiff")}
        del encoders
        decode = build_decode(model, tiny, size, device)
        decode_s = interleaved_ms({"decode": decode}, device, 1, max(repeat // 2, 1))["decode"] / 1e3
    for impl in ("diffusers", "sgdiff"):
        tflops = result["tflop_per_forward"] / (forward_ms[impl] / 1e3)
        result[impl] = {
            "forward_ms": forward_ms[impl],
            "step_ms": step_ms[impl],
            "text_encoding_s": text_s[impl],
            "vae_decode_s": decode_s,
            "end_to_end_s": text_s[impl] + model.steps * step_ms[impl] / 1e3 + decode_s,
            "peak_memory_gib": memory[impl],
            "weights_gib": weights[impl],
            "tflops": tflops,
            "share_of_floor": tflops / peak_tflops if peak_tflops else None,
        }
    result["matmul_tflops"] = peak_tflops
    result["card"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["torch"] = torch.__version__
    result["speed"] = {f: getattr(speed, f) for f in speed.__dataclass_fields__}
    result["attention"] = getattr(attention, "__name__", type(attention).__name__)
    choices = getattr(attention, "choices", None)  # auto with FlashAttention installed: what it measured
    result["attention_choices"] = choices() if choices is not None else None
    return result


def render(result: dict[str, Any]) -> str:
    """The table `sgdiff bench` prints."""
    size = result["size"]
    frames = f"x{size['frames']}" if BENCH_MODELS[result["model"]].frames else ""
    if result.get("input_images"):
        frames += f" + {result['input_images']} input image{'s' * (result['input_images'] > 1)} of that size"
    d, s = result["diffusers"], result["sgdiff"]
    toggles = ", ".join(f"{k}={v}" for k, v in result["speed"].items())
    lines = [
        f"{result['model']} {size['width']}x{size['height']}{frames}, {result['steps']} steps"
        f"{' (TINY)' if result['tiny'] else ''}; {result['card']}, torch {result['torch']}; {toggles}",
        f"{'':28} {'diffusers':>10} {'sgdiff':>10} {'speed-up':>9}",
    ]
    rows = [
        ("transformer forward, ms", "forward_ms", "{:10.1f}"),
        ("denoising step, ms", "step_ms", "{:10.1f}"),
        ("text encoding, s", "text_encoding_s", "{:10.3f}"),
        ("VAE decode, s", "vae_decode_s", "{:10.3f}"),
        ("end to end (sum), s", "end_to_end_s", "{:10.2f}"),
        ("peak GPU memory, GiB", "peak_memory_gib", "{:10.1f}"),
        ("transformer weights, GiB", "weights_gib", "{:10.2f}"),
        ("achieved TFLOP/s", "tflops", "{:10.0f}"),
        ("share of the FLOP floor", "share_of_floor", "{:10.0%}"),
    ]
    for label, key, fmt in rows:
        a, b = d[key], s[key]
        if a is None:
            continue
        ratio = f"{a / b:8.2f}x" if key in ("forward_ms", "step_ms", "end_to_end_s") else ""
        lines.append(f"{label:28} {fmt.format(a)} {fmt.format(b)} {ratio:>9}")
    floor = ""
    if result["matmul_tflops"]:
        floor_ms = result["tflop_per_forward"] / result["matmul_tflops"] * 1e3
        floor = f"; floor at this card's {result['matmul_tflops']:.0f} TFLOP/s bf16 matmul: {floor_ms:.1f} ms"
    lines.append(f"FLOPs per forward (counted): {result['tflop_per_forward']:.4g} T{floor}")
    fp8 = result["speed"].get("dit_precision") == "fp8"
    agreement = "rel err, sgdiff with FP8 weights vs diffusers' bf16" if fp8 else "bf16 rel err, sgdiff vs diffusers"
    lines.append(f"{agreement}: {result['bf16_rel_err']:.2e}; "
                 f"sgdiff's first forward (compile, capture): {result['sgdiff_first_forward_s']:.1f} s")  # fmt: skip
    for choice in result.get("attention_choices") or []:
        times = ", ".join(f"{name} {ms:.3f}" for name, ms in choice["ms"].items())
        lines.append(f"attention (auto) at q {choice['q']}, k {choice['k']}: {choice['kernel']} (ms per call: {times})")
    return "\n".join(lines)
