"""LoRA speed at full size (issue 32's targets) on one GPU: FLUX.1-dev's transformer (sgdiff's own, random
bf16 weights) without adapters, with two rank-R adapters kept beside its Linears (unfused: one at scale 1, the
other at 0, what a server that offers both runs) and with one adapter fused into its weights.

Measured:
  - ms per forward, the variants timed in turns (sgdiff/bench/run.py interleaved_times: drift hits all alike):
    base against unfused (both models in memory), then, the base freed, fused against unfused. Fused against
    base is the product of the two ratios (fused / unfused * unfused / base). Targets: unfused <= 1.05x base;
    fused = base within noise (the same kernels: a sanity check).
  - seconds to read one adapter file (read_lora; the file was just written, so it comes from the page cache).
  - seconds to switch adapters between two requests as the engine does (EngineAdapters.activate ->
    set_scales), synchronized, median of several; target <= 0.5 s: on the unfused model (scales written), and
    on the fused one (a server's default: the other adapter fused anew from the copy of the base weights, which
    `--fused-base` puts on the GPU or in page-locked CPU memory); for comparison, remove +
    apply_loras(keep_base=True) of the other adapter (the base copied anew).
  - outputs: adapter 1 against adapter 2 (must differ by far more than bf16 noise), the unfused model switched
    to adapter 2 against adapter 2 freshly fused (equal within bf16), unfused against fused adapter 1.
  - with torch.compile (--speed all): graphs compiled while switching (must be 0).

Adapters go on after the model is on its device and before the speed toggles, as the engine applies them
(engine/runner.py). At most two full-size transformers (~24 GB each) are held at once.

    python scripts/bench_lora.py [--speed all] [--rank 64] [--fused-base cpu] [--warmup 2] [--repeat 10] [--json F]
    python scripts/bench_lora.py --tiny --device cpu --warmup 1 --repeat 3  # checks the script on a CPU
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdiff.bench.parts import BENCH_MODELS, TINY_FLUX, TINY_SIZE, seeded, transformer_inputs  # noqa: E402
from sgdiff.bench.run import interleaved_times, seconds_of, synchronize  # noqa: E402
from sgdiff.config import SpeedConfig  # noqa: E402
from sgdiff.families.flux.family import FluxFamily  # noqa: E402
from sgdiff.lora import AppliedLoras, LoraWeights, apply_loras, read_lora  # noqa: E402
from sgdiff.models.attention import use_attention_impl  # noqa: E402
from sgdiff.models.flux import FluxTransformer  # noqa: E402
from sgdiff.models.layers import Linear  # noqa: E402
from sgdiff.models.lora import LowRank  # noqa: E402
from sgdiff.speed.apply import check_speed, resolve_speed, speed_up_transformer  # noqa: E402
from sgdiff.testing.compare import relative_error  # noqa: E402

FLUX = BENCH_MODELS["flux.1-dev"]
# each adapter's delta W = B @ A: about this share of its Linear's weight (std of a default-initialised one)
UPDATE_SIZE = 0.1
UNFUSED_TARGET = 1.05  # unfused ms / base ms
FUSED_NOISE = 0.02  # fused ms / base ms within 1 +- this: "the same, within noise"
SWITCH_TARGET_S = 0.5
BF16_TOLERANCE = 2e-2  # two bf16 computations of one output (probes/lora_cuda.py: 1.5e-2 against fp32)
DIFFERS = 10  # adapter 1's and adapter 2's outputs: at least this many times the bf16 noise measured apart
FUSED_SWITCHES = 4  # at most (remove + apply copies the base weights anew each time)
TOGGLES = ("fused_projections", "fused_gelu", "fused_norms", "torch_compile", "cuda_graph")


@dataclass(frozen=True)
class Setup:
    device: torch.device
    tiny: bool
    speed: SpeedConfig  # resolved for the device
    attention: Any  # the attention kernel (check_speed)
    warmup: int
    repeat: int
    fused_base: str  # where the fused model's copy of the base weights lives: device or cpu

    def build(self) -> FluxTransformer:
        """FLUX.1-dev's transformer (--tiny: the tests' tiny one) in bf16 on the device; the same weights every
        time (seed 0)."""
        config = replace(TINY_FLUX, guidance_embeds=FLUX.config.guidance_embeds) if self.tiny else FLUX.config
        return seeded(0, torch.bfloat16, self.device, lambda: FluxTransformer(config))

    def inputs(self, model: FluxTransformer) -> dict:
        size = dict(TINY_SIZE) if self.tiny else dict(height=FLUX.height, width=FLUX.width)
        return transformer_inputs(FLUX, model, size, self.device, seed=1)

    def forward(self, model: FluxTransformer, inputs: dict) -> Callable[[], torch.Tensor]:
        """One forward as a pipeline runs it: inference mode, the chosen attention kernel."""

        def forward():
            with torch.inference_mode(), use_attention_impl(self.attention):
                return model(**inputs)

        return forward

    def speed_up(self, model: FluxTransformer) -> None:
        speed_up_transformer(model, self.speed, FluxFamily())


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")
    return torch.device(name)


def speed_config(name: str, device: torch.device) -> SpeedConfig:
    """defaults: `sgdiff generate`'s (SpeedConfig() resolved for the device, as `sgdiff bench` resolves it);
    all: `sgdiff bench`'s "all six" (fused projections, GELU and norms, torch.compile, CUDA graph, attention
    auto), on a CPU without the fused norms and the CUDA graph (CUDA only)."""
    speed = SpeedConfig()
    if name == "all":
        cuda = device.type == "cuda"
        speed = SpeedConfig(fused_projections=True, fused_gelu=True, fused_norms=cuda, torch_compile=True,
                            cuda_graph=cuda)  # fmt: skip
    return resolve_speed(speed, device, torch.bfloat16)


def adapter_tensors(model: FluxTransformer, rank: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A random rank-`rank` adapter over every Linear of `model` in diffusers/PEFT names, bf16: lora_A
    [rank, in], lora_B [out, rank]. B @ A has about UPDATE_SIZE times the std of a default-initialised
    weight (uniform, std 1 / sqrt(3 in)): var = rank * (1 / in) * (UPDATE_SIZE^2 / (3 rank))."""
    g = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            down = torch.randn(rank, module.in_features, generator=g, device=device) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=g, device=device) * UPDATE_SIZE / (3 * rank) ** 0.5
            tensors[f"transformer.{name}.lora_A.weight"] = down.to("cpu", torch.bfloat16)
            tensors[f"transformer.{name}.lora_B.weight"] = up.to("cpu", torch.bfloat16)
    return tensors


def write_adapters(model: FluxTransformer, rank: int, folder: Path, device: torch.device) -> list[Path]:
    paths = [folder / f"adapter{seed}.safetensors" for seed in (1, 2)]
    for seed, path in enumerate(paths, start=1):
        save_file(adapter_tensors(model, rank, seed, device), path)
    return paths


def read_timed(path: Path) -> tuple[LoraWeights, float]:
    start = time.perf_counter()
    weights = read_lora(str(path))
    return weights, time.perf_counter() - start


def compiled_graphs(speed: SpeedConfig) -> int:
    """Graphs torch.compile has compiled in this process so far (0 without compile)."""
    if not speed.torch_compile:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def stats(times: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "ms": times}


def time_forwards(setup: Setup, forwards: dict[str, Callable]) -> dict[str, dict]:
    """Each variant's first forward (compile, capture), then ms per forward in interleaved rounds."""
    first = {name: seconds_of(fn, setup.device) for name, fn in forwards.items()}
    times = interleaved_times(forwards, setup.device, setup.warmup, setup.repeat)
    return {name: {"first_forward_s": first[name], **stats(times[name])} for name in forwards}


def base_against_unfused(setup: Setup, unfused: FluxTransformer) -> tuple[dict, torch.Tensor, weakref.ref]:
    """(timings of base and unfused, the base's output, a weak reference to the base: dead once freed)."""
    base = setup.build()
    setup.speed_up(base)
    inputs = setup.inputs(base)
    forwards = {"base": setup.forward(base, inputs), "unfused": setup.forward(unfused, inputs)}
    timings = time_forwards(setup, forwards)
    return timings, forwards["base"]().float().cpu(), weakref.ref(base)


def freed(model: weakref.ref, device: torch.device) -> bool:
    """Whether the model `model` refers to is gone (its memory back to the allocator's cache, and the cache
    emptied on CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model() is None


def scale_switches(handle: AppliedLoras, forward: Callable, device: torch.device, count: int) -> tuple[list, dict]:
    """`count` switches between the two adapters by set_scales (adapter 1 active at the start), each timed
    synchronized and followed by the request's forward. Returns (seconds of each switch, the last output of
    each adapter: 0 or 1 -> output)."""
    seconds, outputs = [], {}
    for i in range(count):
        scales = [0.0, 1.0] if i % 2 == 0 else [1.0, 0.0]
        seconds.append(seconds_of(functools.partial(handle.set_scales, scales), device))
        outputs[scales.index(1.0)] = forward().float().cpu()
    return seconds, outputs


def adapter_mib(model: FluxTransformer) -> float:
    """Device memory of the unfused adapters' factors, MiB."""
    lows = [m for m in model.modules() if isinstance(m, LowRank)]
    return sum(t.nbytes for m in lows for t in (m.down, m.up, m.scale)) / 2**20


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    if device.type != "cuda" and not args.tiny:
        sys.exit("full size builds two ~24 GB transformers and needs a CUDA GPU; --tiny checks the script on a CPU")
    speed = speed_config(args.speed, device)
    attention = check_speed(speed, device, torch.bfloat16)
    setup = Setup(device, args.tiny, speed, attention, args.warmup, args.repeat, args.fused_base)
    result: dict[str, Any] = {
        "tiny": args.tiny,
        "rank": args.rank,
        "speed": args.speed,
        "toggles": {name: getattr(speed, name) for name in TOGGLES},
        "attention": getattr(attention, "__name__", type(attention).__name__),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    folder = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    try:
        return measure(setup, args.rank, folder, result)
    finally:
        for path in folder.glob("*.safetensors"):
            path.unlink()
        folder.rmdir()


def measure(setup: Setup, rank: int, folder: Path, result: dict[str, Any]) -> dict[str, Any]:
    device, say = setup.device, functools.partial(print, flush=True)
    start = time.perf_counter()
    unfused = setup.build()
    paths = write_adapters(unfused, rank, folder, device)
    result["adapter_mb"] = paths[0].stat().st_size / 1e6
    first, result["read_lora_s"] = read_timed(paths[0])
    adapters = [first, read_lora(str(paths[1]))]
    # (b): both adapters beside every Linear, adapter 1 at scale 1 and adapter 2 at 0, then the speed toggles
    unfused_loras = apply_loras(unfused, [(adapters[0], 1.0), (adapters[1], 0.0)], "unfused")
    setup.speed_up(unfused)
    result["unfused_adapter_mib"] = adapter_mib(unfused)
    result["linears"] = sum(isinstance(m, Linear) for m in unfused.modules())
    say(f"adapters: {result['linears']} Linears, rank {rank}, {result['adapter_mb']:.1f} MB a file, read in "
        f"{result['read_lora_s']:.3f} s; model built, adapters written, read and applied unfused in "
        f"{time.perf_counter() - start:.1f} s")  # fmt: skip

    # (a) base against (b) unfused, both in memory; then the base freed
    timings, base_out, base = base_against_unfused(setup, unfused)
    result["base"], result["unfused"] = timings["base"], timings["unfused"]
    say(f"base {timings['base']['median_ms']:.2f} ms, unfused {timings['unfused']['median_ms']:.2f} ms")
    result["base_freed"] = freed(base, device)
    if not result["base_freed"]:
        say("WARNING: the base model was not freed (something still holds it); the fused model adds to it")

    # switching between requests on the unfused model (EngineAdapters.activate -> set_scales)
    inputs = setup.inputs(unfused)
    unfused_forward = setup.forward(unfused, inputs)
    adapter1_out = unfused_forward().float().cpu()
    graphs = compiled_graphs(setup.speed)
    switch_s, unfused_outs = scale_switches(unfused_loras, unfused_forward, device, max(setup.repeat, 2))
    result["graphs_compiled_while_switching"] = compiled_graphs(setup.speed) - graphs
    unfused_loras.set_scales([1.0, 0.0])  # (back to adapter 1 for the timing against fused)
    result["switch_set_scales_s"] = statistics.median(switch_s)
    result["switch_set_scales_all_s"] = switch_s
    say(f"unfused switch (set_scales): median {result['switch_set_scales_s'] * 1e3:.2f} ms of {len(switch_s)}")

    # (c) fused against (b) unfused, and the fused switches
    fused1_out, fused_scale_outs, fresh_outs, fused = fused_part(setup, adapters, inputs, unfused_forward, result)
    result["fused_freed"] = freed(fused, device)  # (compiled blocks hold their module in a cycle: gc frees it)
    if not result["fused_freed"]:
        say("WARNING: the fused model was not freed (something still holds it); the next model adds to it")
    one_adapter_part(setup, adapters[0], inputs, unfused_forward, result)
    result["graphs_compiled"] = compiled_graphs(setup.speed)  # (in all: the check above is not vacuous)
    if not setup.speed.torch_compile:
        result["graphs_compiled_while_switching"] = None
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    result["rel_err"] = {
        "adapter1_vs_base": relative_error(adapter1_out, base_out),
        "adapter2_vs_adapter1": relative_error(unfused_outs[1], unfused_outs[0]),
        "unfused_vs_fused_adapter1": relative_error(adapter1_out, fused1_out),
        "switched_unfused_vs_fresh_fused_adapter2": relative_error(unfused_outs[1], fresh_outs[1]),
        "switched_back_vs_before_adapter1": relative_error(unfused_outs[0], adapter1_out),
        "fused_set_scales_vs_fresh_adapter2": relative_error(fused_scale_outs[1], fresh_outs[1]),
    }
    result |= ratios(result)
    result["checks"] = checks(result)
    return result


def one_adapter_part(
    setup: Setup, adapter: LoraWeights, inputs: dict, unfused_forward: Callable, result: dict[str, Any]
) -> None:
    """(d): adapter 1 alone beside the Linears (a server that offers one adapter; rank R, not 2R), then the
    speed toggles; timed against (b) once the fused model is gone. Into `result`: "unfused_one" and
    "unfused_third" (b in those rounds)."""
    single = setup.build()
    apply_loras(single, [(adapter, 1.0)], "unfused")
    setup.speed_up(single)
    timings = time_forwards(setup, {"unfused_one": setup.forward(single, inputs), "unfused_third": unfused_forward})
    result |= timings
    print(f"one adapter unfused {timings['unfused_one']['median_ms']:.2f} ms, two "
          f"{timings['unfused_third']['median_ms']:.2f} ms", flush=True)  # fmt: skip


def fused_part(
    setup: Setup, adapters: list[LoraWeights], inputs: dict, unfused_forward: Callable, result: dict[str, Any]
) -> tuple[torch.Tensor, dict, dict, weakref.ref]:
    """(c): adapter 1 fused into the weights (adapter 2 at 0, kept for set_scales), then the speed toggles;
    timed against the unfused model. Then the fused switches: set_scales (the base weights back from their CPU
    copy, the other adapter fused), and the long way, remove + apply_loras(keep_base=True) of the other adapter
    (the base weights copied to the CPU anew). Returns (the output with adapter 1, the last output of each
    adapter after set_scales, and after remove + apply: 0 or 1 -> output); the rest goes into `result`."""
    device = setup.device
    fused = setup.build()
    room = 2**62 if setup.fused_base == "device" else 0  # (the engine gives what the GPU has: engine/adapters.py)
    loras = apply_loras(fused, [(adapters[0], 1.0), (adapters[1], 0.0)], "fused", keep_base=True, base_room=room)
    result["fused_base"] = str(loras.applied.base_device)
    setup.speed_up(fused)
    forward = setup.forward(fused, inputs)
    timings = time_forwards(setup, {"unfused": unfused_forward, "fused": forward})
    result["fused"], result["unfused_again"] = timings["fused"], timings["unfused"]
    print(f"unfused {timings['unfused']['median_ms']:.2f} ms, fused {timings['fused']['median_ms']:.2f} ms", flush=True)
    adapter1_out = forward().float().cpu()

    graphs = compiled_graphs(setup.speed)
    count = min(FUSED_SWITCHES, max(setup.repeat, 2))
    scale_s, scale_outs = scale_switches(loras, forward, device, count)
    active = 1 if count % 2 else 0  # the adapter scale_switches left on
    reapply_s, fresh_outs = [], {}
    held = [loras]  # (one handle at a time: each removed and dropped, with its CPU copy, before the next copy)
    del loras
    for _ in range(count):
        target = 1 - active
        synchronize(device)
        start = time.perf_counter()
        held.pop().remove()
        held.append(apply_loras(fused, [(adapters[target], 1.0)], "fused", keep_base=True, base_room=room))
        synchronize(device)
        reapply_s.append(time.perf_counter() - start)
        fresh_outs[target], active = forward().float().cpu(), target
    result["graphs_compiled_while_switching"] += compiled_graphs(setup.speed) - graphs
    result["switch_fused_set_scales_s"] = statistics.median(scale_s)
    result["switch_fused_reapply_s"] = statistics.median(reapply_s)
    result["switch_fused_all_s"] = {"set_scales": scale_s, "remove_and_apply": reapply_s}
    return adapter1_out, scale_outs, fresh_outs, weakref.ref(fused)


def round_ratios(over: dict, under: dict) -> list[float]:
    """Each round's ms of `over` / ms of `under`, timed in the same round (drift between rounds cancels)."""
    return [a / b for a, b in zip(over["ms"], under["ms"], strict=True)]


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Against the base, medians (and ranges) of the rounds' ratios: unfused / base from the first rounds; fused
    as fused / unfused (second rounds) times unfused / base (first rounds), the base freed before the fused
    model is built."""
    unfused = round_ratios(result["unfused"], result["base"])
    fused_vs_unfused = round_ratios(result["fused"], result["unfused_again"])
    chained = [statistics.median(fused_vs_unfused) * statistics.median(unfused),
               min(fused_vs_unfused) * min(unfused), max(fused_vs_unfused) * max(unfused)]  # fmt: skip
    one_vs_two = round_ratios(result["unfused_one"], result["unfused_third"])
    return {
        "unfused_one_ratio": statistics.median(one_vs_two) * statistics.median(unfused),
        "unfused_one_ratio_range": [min(one_vs_two) * min(unfused), max(one_vs_two) * max(unfused)],
        "unfused_ratio": statistics.median(unfused),
        "unfused_ratio_range": [min(unfused), max(unfused)],
        "fused_vs_unfused": statistics.median(fused_vs_unfused),
        "fused_ratio": chained[0],
        "fused_ratio_range": chained[1:],
    }


def checks(result: dict[str, Any]) -> dict[str, bool]:
    """Targets (speed) and checks (correctness: a failed one makes the exit status 1)."""
    err = result["rel_err"]
    noise = max(err["unfused_vs_fused_adapter1"], err["switched_unfused_vs_fresh_fused_adapter2"], 1e-3)
    compiled = result["graphs_compiled_while_switching"]
    return {
        "target_unfused": result["unfused_ratio"] <= UNFUSED_TARGET,
        "target_unfused_one": result["unfused_one_ratio"] <= UNFUSED_TARGET,
        "target_fused": abs(result["fused_ratio"] - 1) <= FUSED_NOISE,
        "target_switch": result["switch_set_scales_s"] <= SWITCH_TARGET_S,
        "target_fused_switch": result["switch_fused_set_scales_s"] <= SWITCH_TARGET_S,
        "check_adapters_differ": err["adapter2_vs_adapter1"] >= DIFFERS * noise,
        "check_switch_equals_fresh": err["switched_unfused_vs_fresh_fused_adapter2"] <= BF16_TOLERANCE,
        "check_unfused_equals_fused": err["unfused_vs_fused_adapter1"] <= BF16_TOLERANCE,
        "check_switch_back_exact": err["switched_back_vs_before_adapter1"] == 0,
        "check_fused_switch_exact": err["fused_set_scales_vs_fresh_adapter2"] == 0,
        "check_no_recompile": compiled in (None, 0),
        "check_base_freed": result["base_freed"],
    }


def render(result: dict[str, Any]) -> str:
    """The table printed last."""

    def ms(key: str) -> str:
        t = result[key]
        return f"{t['median_ms']:10.2f} {t['min_ms']:9.2f}-{t['max_ms']:<9.2f}"

    def ratio(key: str) -> str:
        low, high = result[f"{key}_range"]
        return f"{result[key]:6.3f}x ({low:.3f}-{high:.3f})"

    def met(name: str) -> str:
        return "met" if result["checks"][name] else "MISSED"

    on = ", ".join(name for name, value in result["toggles"].items() if value) or "none"
    err, compiled = result["rel_err"], result["graphs_compiled_while_switching"]
    peak = f", peak {result['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in result else ""
    fused_runs = len(result["switch_fused_all_s"]["set_scales"])
    one_vs_two = result["unfused_one"]["median_ms"] / result["unfused_third"]["median_ms"]
    lines = [
        f"FLUX.1-dev transformer{' (TINY)' if result['tiny'] else ''}, two rank-{result['rank']} adapters over "
        f"{result['linears']} Linears (unfused: both beside each, {result['unfused_adapter_mib']:.0f} MiB); speed "
        f"{result['speed']} ({on}; attention {result['attention']}); {result['card']}, torch {result['torch']}{peak}",
        f"{'':32} {'median':>10} {'min-max':>19} {'vs base (rounds)':>24}  target",
        f"{'base forward, ms':32} {ms('base')}",
        f"{'unfused forward (1 of 2 on), ms':32} {ms('unfused')} {ratio('unfused_ratio'):>24}  "
        f"<= {UNFUSED_TARGET}x: {met('target_unfused')}",
        f"{'unfused forward (1 adapter), ms':32} {ms('unfused_one')} {ratio('unfused_one_ratio'):>24}  "
        f"<= {UNFUSED_TARGET}x: {met('target_unfused_one')}",
        f"{'fused forward (1 adapter), ms':32} {ms('fused')} {ratio('fused_ratio'):>24}  "
        f"1 +- {FUSED_NOISE}: {met('target_fused')}",
        f"  fused vs base: fused / unfused {result['fused_vs_unfused']:.3f}x (unfused "
        f"{result['unfused_again']['median_ms']:.2f} ms in those rounds) times unfused / base "
        f"{result['unfused_ratio']:.3f}x (the base freed before)",
        f"  1 adapter unfused vs base: 1 / 2 unfused {one_vs_two:.3f}x (2 unfused "
        f"{result['unfused_third']['median_ms']:.2f} ms in those rounds) times 2 unfused / base",
        f"  first forward (compile, capture), s: base {result['base']['first_forward_s']:.2f}, unfused "
        f"{result['unfused']['first_forward_s']:.2f}, fused {result['fused']['first_forward_s']:.2f}",
        f"{'read_lora of one adapter, s':32} {result['read_lora_s']:10.3f}   {result['adapter_mb']:.1f} MB file "
        "(from the page cache)",
        f"{'switch, unfused set_scales, s':32} {result['switch_set_scales_s']:10.4f}   median of "
        f"{len(result['switch_set_scales_all_s'])}{'':29}<= {SWITCH_TARGET_S} s: {met('target_switch')}",
        f"{'switch, fused set_scales, s':32} {result['switch_fused_set_scales_s']:10.3f}   median of {fused_runs} "
        f"(base copy on {result['fused_base']}){'':7}<= {SWITCH_TARGET_S} s: {met('target_fused_switch')}",
        f"{'switch, fused remove + apply, s':32} {result['switch_fused_reapply_s']:10.3f}   median of {fused_runs}",
        f"outputs, rel err: adapter 2 vs 1 {err['adapter2_vs_adapter1']:.3g} (1 vs base "
        f"{err['adapter1_vs_base']:.3g}); switched vs fresh adapter 2 "
        f"{err['switched_unfused_vs_fresh_fused_adapter2']:.3g}, unfused vs fused adapter 1 "
        f"{err['unfused_vs_fused_adapter1']:.3g} (bf16 tolerance {BF16_TOLERANCE}); switched back "
        f"{err['switched_back_vs_before_adapter1']:.3g}; fused set_scales vs fresh "
        f"{err['fused_set_scales_vs_fresh_adapter2']:.3g}",
        "graphs compiled while switching: "
        + ("n/a (no torch.compile)" if compiled is None else f"{compiled} (in all: {result['graphs_compiled']})"),
    ]
    failed = [name for name, ok in result["checks"].items() if name.startswith("check_") and not ok]
    lines.append(f"checks: {'FAILED ' + ', '.join(failed) if failed else 'all passed'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="LoRA adapters' cost per forward and switch time (issue 32)")
    parser.add_argument("--rank", type=int, default=64, help="each adapter's rank")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards of each variant")
    parser.add_argument("--repeat", type=int, default=10, help="timed rounds; also the unfused switches")
    parser.add_argument("--speed", choices=("defaults", "all"), default="defaults",
                        help="`sgdiff generate`'s default toggles, or all six (torch.compile, CUDA graph)")  # fmt: skip
    parser.add_argument("--fused-base", choices=("device", "cpu"), default="device",
                        help="where the fused model keeps its copy of the base weights for switching")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny FLUX: checks the script on a CPU")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.rank < 1 or args.repeat < 1 or args.warmup < 0:
        sys.exit("--rank and --repeat must be at least 1, --warmup at least 0")
    if args.json is not None and not args.json.parent.is_dir():
        sys.exit(f"--json {args.json}: the folder {args.json.parent} does not exist")
    result = run(args)
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(ok for name, ok in result["checks"].items() if name.startswith("check_")) else 1


if __name__ == "__main__":
    sys.exit(main())
