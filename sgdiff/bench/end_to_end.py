"""`sgdiff bench --e2e`: what a user waits for, from the shell to the file. A checkpoint is written to
disk once; then `sgdiff generate` and a plain diffusers script (`from_pretrained(...).to(device)`, one
call per prompt, `.save`) run as fresh processes in turns, with the page cache warm (after untimed
runs) or dropped before each run (`cold`, needs root). Each side's phases come from the process
itself: sgdiff's --perf-dump-path, the script's own clock."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgdiff.bench.parts import BENCH_MODELS
from sgdiff.config import load_preset
from sgdiff.errors import UserError
from sgdiff.models.resolve import DEMO_IMAGE_MODEL, DEMO_VIDEO_MODEL, demo_model_dir

PROMPTS = ["a cat holding a sign that says hello", "a red cube on a wooden table", "a lighthouse at dusk",
           "a bowl of ramen, studio photo"]  # fmt: skip
TINY = dict(height=64, width=64, steps=4)
TINY_FRAMES = 9
SEQUENCE_LENGTH = {"flux.1-dev": 512, "flux.1-schnell": 256, "wan2.1-t2v-1.3b": 512,
                   "qwen-image": 512}  # the presets' (diffusers: 512)  # fmt: skip
WAN_GUIDANCE = 5.0  # both sides (the preset's is 3.0; diffusers' default 5.0): CFG, two forwards a step
# Qwen-Image: true CFG 4 (both sides' default scale) against a negative prompt, which turns it on
TRUE_CFG = {"qwen-image": dict(negative_prompt=" ", true_cfg_scale=4.0)}
FPS = 16
# --e2e on the embedded demo models (a CPU is enough): `sgdiff generate --model-path NAME` against diffusers on the
# model's folder, each at the demo preset's size
DEMO_MODELS = {"demo-image": DEMO_IMAGE_MODEL, "demo-video": DEMO_VIDEO_MODEL}

# The diffusers side, as a user writes it; prints its phases as JSON on its last line.
DIFFUSERS_SCRIPT = """
import json, sys, time
began = time.clock_gettime(time.CLOCK_BOOTTIME)
start = time.perf_counter()
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video
imported = time.perf_counter()
a = json.loads(sys.argv[1])
dtype = torch.bfloat16 if a["device"] == "cuda" else torch.float32
pipe = DiffusionPipeline.from_pretrained(a["model"], torch_dtype=dtype).to(a["device"])
pipe.set_progress_bar_config(disable=True)
loaded = time.perf_counter()
called = 0.0
written = 0.0
for index, prompt in enumerate(a["prompts"]):
    t0 = time.perf_counter()
    kwargs = dict(height=a["height"], width=a["width"], num_inference_steps=a["steps"],
                  max_sequence_length=a["max_sequence_length"], generator=torch.Generator("cpu").manual_seed(42),
                  **a.get("true_cfg", {}))
    if a.get("num_frames"):
        frames = pipe(prompt, num_frames=a["num_frames"], guidance_scale=a["guidance_scale"], **kwargs).frames[0]
    else:
        image = pipe(prompt, **kwargs).images[0]
    if a["device"] == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    if a.get("num_frames"):
        export_to_video(frames, f"{a['out']}/diffusers_{index}.mp4", fps=a["fps"])
    else:
        image.save(f"{a['out']}/diffusers_{index}.png")
    called += t1 - t0
    written += time.perf_counter() - t1
print(json.dumps({"imports": imported - start, "load": loaded - imported, "generate": called, "write": written,
                  "began": began, "ended": time.clock_gettime(time.CLOCK_BOOTTIME)}))
"""


@dataclass
class Run:
    wall: float  # shell -> file: the process from spawn to exit, its files written
    phases: dict[str, float]
    load_parts: dict[str, list[float]] | None = None  # sgdiff: each component's [began, ended] load, in
    # seconds after the load began
    speed: dict | None = None  # sgdiff: the toggles as resolved, compile cache use, CUDA graph capture
    step_seconds: list[float] | None = None  # sgdiff: every denoising step of the first prompt
    peak_gpu_gib: float | None = None  # sgdiff: the most GPU memory a request held (None on the CPU)
    request_seconds: list[float] | None = None  # sgdiff: each prompt's request in the engine (text, denoise, decode)


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise UserError(f"`cold` drops the page cache, which needs root ({exc.strerror})", field="cold") from None


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, the boot clock at spawn, stdout) of a process that must succeed."""
    spawned = time.clock_gettime(time.CLOCK_BOOTTIME)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, spawned, done.stdout


def run_sgdiff(model: str, prompts: list[str], size: dict, device: str, speed_flags: list[str], out: Path) -> Run:
    prompt_file, perf = out / "prompts.txt", out / "perf.json"
    prompt_file.write_text("\n".join(prompts) + "\n")
    command = [sys.executable, "-c", "from sgdiff.cli.main import main; main()", "generate", "--model-path",
               model, "--prompt-file", str(prompt_file), "--height", str(size["height"]), "--width",
               str(size["width"]), "--steps", str(size["steps"]), "--max-sequence-length",
               str(size["max_sequence_length"]), "--device", device, "--output-path", str(out / "sgdiff"),
               "--perf-dump-path", str(perf), "--quiet", *speed_flags]  # fmt: skip
    if size.get("num_frames"):
        command += ["--num-frames", str(size["num_frames"]), "--guidance-scale", str(size["guidance_scale"]),
                    "--fps", str(size["fps"])]  # fmt: skip
    if size.get("true_cfg"):
        cfg = size["true_cfg"]
        command += ["--negative-prompt", cfg["negative_prompt"], "--true-cfg-scale", str(cfg["true_cfg_scale"])]
    wall, _, _ = timed(command)
    dump = json.loads(perf.read_text())
    requests = dump["requests"]
    stage = lambda name: sum(r["stage_seconds"].get(name, 0.0) for r in requests)  # noqa: E731
    in_requests = sum(r["total_seconds"] for r in requests)
    before, at_dump = dump.get("process_age_at_start"), dump.get("process_age_at_dump")
    if before is None or at_dump is None:  # no /proc: the interpreter, imports, checks and exit together
        before, at_dump = wall - dump["total_seconds"], wall
    return Run(wall, {
        "start-up": before,  # the interpreter, imports, checks
        "load": dump["load_seconds"],
        "text": stage("text_encoding"),
        "denoise": stage("denoising"),
        "decode": stage("decoding"),
        "write": dump["total_seconds"] - dump["load_seconds"] - in_requests,
        "exit": wall - at_dump,  # after the perf dump: freeing memory, the interpreter's end
    }, load_spans(dump), dump.get("speed"), requests[0]["step_seconds"], peak_gpu_gib(requests),
        [r["total_seconds"] for r in requests])  # fmt: skip


def peak_gpu_gib(requests: list[dict]) -> float | None:
    peaks = [r["peak_gpu_memory_bytes"] for r in requests if r.get("peak_gpu_memory_bytes") is not None]
    return max(peaks) / 2**30 if peaks else None


def load_spans(dump: dict) -> dict[str, list[float]] | None:
    """Each part's [began, ended] load from a perf dump, in seconds after the load began."""
    if dump.get("load_began") is None:
        return None
    return {name: [round(t - dump["load_began"], 3) for t in span] for name, span in dump["load_part_spans"].items()}


def run_diffusers(model: Path, prompts: list[str], size: dict, device: str, out: Path) -> Run:
    args = dict(model=str(model), prompts=prompts, device=device, out=str(out), **size)
    wall, spawned, stdout = timed([sys.executable, "-c", DIFFUSERS_SCRIPT, json.dumps(args)])
    p = json.loads(stdout.strip().splitlines()[-1])
    return Run(wall, {"start-up": p["began"] - spawned + p["imports"], "load": p["load"],
                      "text + denoise + decode": p["generate"], "write": p["write"],
                      "exit": wall - (p["ended"] - spawned)})  # fmt: skip


def machine_rates(checkpoint: Path, device: str) -> dict[str, float]:
    """What this machine allows, measured now, to set the loads against: reading the checkpoint's
    weight files (8 threads, page cache as the runs left it; GB/s), and on CUDA copying pinned host
    memory to the GPU (GB/s)."""
    import torch

    from sgdiff.models.fast_load import read_range

    files = sorted(checkpoint.rglob("*.safetensors"))
    total = sum(path.stat().st_size for path in files)
    chunk, threads = 256 * 2**20, 8  # each thread reads 32 MB of every chunk
    buffer = torch.empty(chunk, dtype=torch.uint8)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                for offset in range(0, path.stat().st_size, chunk):
                    into, step = buffer[: min(chunk, path.stat().st_size - offset)], chunk // threads
                    slices = [
                        pool.submit(read_range, fd, into[a : a + step], offset + a) for a in range(0, len(into), step)
                    ]
                    for future in slices:
                        future.result()
            finally:
                os.close(fd)
    rates = {"read_gb_per_s": total / 1e9 / (time.perf_counter() - start)}
    if device == "cuda":
        pinned = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
        target = torch.empty_like(pinned, device="cuda")
        target.copy_(pinned)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            target.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        rates["pinned_to_gpu_gb_per_s"] = 5 * 2**30 / 1e9 / (time.perf_counter() - start)
    return rates


def written_checkpoint(name: str, checkpoint_dir: Path, tiny: bool) -> tuple[Path, dict[str, Any]]:
    """A full-size (or `tiny`) checkpoint of a bench model, written once, and the size both sides run."""
    model = BENCH_MODELS[name]
    if model.no_e2e:
        raise UserError(f"--e2e does not run {name}: {model.no_e2e}")
    from sgdiff.bench.checkpoint import ensure_checkpoint  # (the tiny builders' imports, transformers' among them)

    checkpoint = ensure_checkpoint(name, checkpoint_dir, tiny)
    size: dict[str, Any] = dict(TINY) if tiny else dict(height=model.height, width=model.width, steps=model.steps)
    size["max_sequence_length"] = SEQUENCE_LENGTH[name]
    if model.frames is not None:  # a video: an MP4 on each side
        size.update(num_frames=TINY_FRAMES if tiny else model.frames, guidance_scale=WAN_GUIDANCE, fps=FPS)
    if name in TRUE_CFG:
        size["true_cfg"] = TRUE_CFG[name]
    return checkpoint, size


def demo_size(name: str) -> dict[str, Any]:
    """A demo model's preset (presets/demo-*.toml): its size, steps, sequence length and, for the video model,
    frames, guidance (1: no CFG) and fps; both sides run them."""
    sampling = load_preset(name).sampling
    size = dict(height=sampling["height"], width=sampling["width"], steps=sampling["num_inference_steps"],
                max_sequence_length=sampling["max_sequence_length"])  # fmt: skip
    if "num_frames" in sampling:
        size.update(num_frames=sampling["num_frames"], guidance_scale=sampling["guidance_scale"], fps=sampling["fps"])
    return size


def run_end_to_end(name: str, checkpoint_dir: Path | None, *, tiny: bool, prompts: int, warmup: int, repeat: int,
                   cold: bool, speed_flags: list[str], sides: tuple[str, ...] = ("diffusers", "sgdiff"),
                   ) -> dict:  # fmt: skip
    """Both sides (or those of `sides`) `warmup` times untimed, then `repeat` timed rounds in turns; the median
    of each. `checkpoint_dir`: where a full-size or tiny checkpoint is written once (None for a demo model)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    if name in DEMO_MODELS:  # the embedded folder itself; `sgdiff generate` is given the model's name, as users do
        model_arg = DEMO_MODELS[name]
        checkpoint, size = demo_model_dir(model_arg), demo_size(name)
    else:
        checkpoint_dir = checkpoint_dir or Path.home() / ".cache" / "sgdiff" / "bench" / (name + "-tiny" * tiny)
        checkpoint, size = written_checkpoint(name, checkpoint_dir, tiny)
        model_arg = str(checkpoint)
    written = time.perf_counter() - start
    chosen = (PROMPTS * prompts)[:prompts]
    runs: dict[str, list[Run]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(warmup + repeat):
            for side in sides:
                out = Path(tmp) / f"{side}-{round_}"
                out.mkdir()
                if cold:
                    drop_page_cache()
                if side == "sgdiff":
                    run = run_sgdiff(model_arg, chosen, size, device, speed_flags, out)
                else:
                    run = run_diffusers(checkpoint, chosen, size, device, out)
                if round_ >= warmup:
                    runs[side].append(run)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rates = machine_rates(checkpoint, device)
    return {
        "model": name, "tiny": tiny, "device": device_name, "prompts": prompts, "cold": cold,
        "checkpoint": str(checkpoint), "checkpoint_gb": folder_bytes(checkpoint) / 1e9,
        "checkpoint_written_seconds": written, "speed_flags": speed_flags, "machine": rates, **size,
        "runs": {side: [vars(run) for run in side_runs] for side, side_runs in runs.items()},
    }  # fmt: skip


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def render_end_to_end(result: dict) -> str:
    def median(side: str, key: str | None = None) -> float:
        runs = result["runs"][side]
        return statistics.median(run["wall"] if key is None else run["phases"][key] for run in runs)

    cache = "cold page cache" if result["cold"] else "warm page cache"
    flags = " ".join(result["speed_flags"]) or "defaults"
    lines = [
        f"{result['model']}{' (tiny)' if result['tiny'] else ''} on {result['device']}: {result['prompts']} "
        f"prompt(s), {result['height']}x{result['width']}, {result['steps']} steps, {cache}; sgdiff {flags}; "
        f"median of {len(result['runs']['sgdiff'])}",
    ]
    sides = list(result["runs"])  # ("sgdiff" alone with --sgdiff-only)
    if "diffusers" in sides:
        diffusers, sgdiff = median("diffusers"), median("sgdiff")
        ratio = diffusers / sgdiff
        lines.append(f"  shell -> file      diffusers {diffusers:8.2f} s   sgdiff {sgdiff:8.2f} s   {ratio:.2f}x")
    else:
        lines.append(f"  shell -> file      sgdiff {median('sgdiff'):8.2f} s (diffusers not run)")
    for side in sides:
        phases = result["runs"][side][0]["phases"]
        lines.append(f"  {side:<9} " + ", ".join(f"{key} {median(side, key):.2f} s" for key in phases))
    peak = result["runs"]["sgdiff"][0].get("peak_gpu_gib")
    if peak is not None:
        steps = result["runs"]["sgdiff"][0].get("step_seconds") or [0.0]
        lines.append(f"  sgdiff peak GPU memory {peak:.1f} GiB; median step {statistics.median(steps):.3f} s")
    later = [seconds for run in result["runs"]["sgdiff"] for seconds in (run.get("request_seconds") or [])[1:]]
    if later:  # several prompts: what a request costs a loaded engine (a server's request -> response)
        first = statistics.median(run["request_seconds"][0] for run in result["runs"]["sgdiff"])
        lines.append(f"  sgdiff request on the loaded engine (text, denoise, decode): first {first:.2f} s, "
                     f"later ones median {statistics.median(later):.2f} s")  # fmt: skip
    gb, machine = result["checkpoint_gb"], result["machine"]
    copy = machine.get("pinned_to_gpu_gb_per_s")
    loads = ", ".join(f"{side} {rate(gb / median(side, 'load'))}" for side in sides)
    lines.append(
        f"  load     {amount(gb)}: {loads}; this machine reads the files at {rate(machine['read_gb_per_s'])}"
        + (f" and copies pinned memory to the GPU at {rate(copy)}" if copy else "")
    )
    return "\n".join(lines)


def amount(gb: float) -> str:
    return f"{gb:.1f} GB" if gb >= 1 else f"{gb * 1e3:.0f} MB"  # (the demo models: tens of MB)


def rate(gb_per_s: float) -> str:
    return f"{gb_per_s:.1f} GB/s" if gb_per_s >= 1 else f"{gb_per_s * 1e3:.0f} MB/s"
