"""The flags of `sgdiff generate`, shared as Annotated types (SGLang's names).

Sampling flags default to None: None means 'not given', so the preset's value is used.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class OutputFormatChoice(str, Enum):
    png = "png"
    mp4 = "mp4"


# the names of sgdiff/speed/attention_backends.py (a test keeps them equal); mypy cannot list a functional
# Enum's members from a comprehension, hence the ignores where one is named
AttentionBackendChoice = Enum(  # type: ignore[misc]
    "AttentionBackendChoice",
    {name: name for name in ("auto", "fa", "sdpa", "cudnn", "flash", "efficient", "math", "flex", "fa3", "sage")},
    type=str,
)


class DitPrecisionChoice(str, Enum):  # speed/fp8.py DIT_PRECISIONS (a test keeps them equal)
    default = "default"
    fp8 = "fp8"


class TorchCompileModeChoice(str, Enum):  # config.COMPILE_MODES (a test keeps them equal)
    ahead = "ahead"
    just_in_time = "just-in-time"


class CacheChoice(str, Enum):  # "none", config.RECOMMENDED_CACHE and config.CACHE_METHODS (a test keeps them equal)
    none = "none"
    recommended = "recommended"
    fbcache = "fbcache"
    teacache = "teacache"
    magcache = "magcache"
    taylorseer = "taylorseer"


MODEL = "Model"
SAMPLING = "Sampling"
OUTPUT = "Output"
RUNTIME = "Runtime"
SPEED = "Speed"

ModelPath = Annotated[
    str | None,
    typer.Option(
        "--model-path",
        help="Hub repo id (owner/name) or a local diffusers-format folder; default: the embedded demo model "
        "sgdiff/demo-image (generate: sgdiff/demo-video when --num-frames is given).",
        rich_help_panel=MODEL,
    ),
]
Revision = Annotated[
    str | None,
    typer.Option(
        "--revision",
        help="With a Hub repo id as --model-path: the branch, tag or commit hash to load (default: main).",
        rich_help_panel=MODEL,
    ),
]
PresetName = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="Preset name (e.g. flux.1-dev) or a .toml file; default: chosen from the model.",
        rich_help_panel=MODEL,
    ),
]
Prompt = Annotated[str | None, typer.Option("--prompt", help="Text prompt.", rich_help_panel=SAMPLING)]
PromptFile = Annotated[
    Path | None,
    typer.Option(
        "--prompt-file",
        help='File with one prompt per line (FILE.jsonl: one JSON object per line, with "prompt" and its own '
        "seed, size, ...); the model loads once and every prompt runs.",
        rich_help_panel=SAMPLING,
    ),
]
NegativePrompt = Annotated[
    str | None,
    typer.Option(
        "--negative-prompt",
        help="Negative prompt for true CFG (FLUX: needs --true-cfg-scale > 1).",
        rich_help_panel=SAMPLING,
    ),
]
Height = Annotated[
    int | None,
    typer.Option("--height", help="Height in pixels, a multiple of 16 (32 for Wan2.2 TI2V).", rich_help_panel=SAMPLING),
]
Width = Annotated[
    int | None,
    typer.Option("--width", help="Width in pixels, a multiple of 16 (32 for Wan2.2 TI2V).", rich_help_panel=SAMPLING),
]
Steps = Annotated[
    int | None, typer.Option("--num-inference-steps", "--steps", help="Denoising steps.", rich_help_panel=SAMPLING)
]
GuidanceScale = Annotated[
    float | None,
    typer.Option(
        "--guidance-scale",
        help="FLUX.1-dev: the embedded guidance; Wan, HunyuanVideo-1.5: the CFG scale.",
        rich_help_panel=SAMPLING,
    ),
]
TrueCfgScale = Annotated[
    float | None,
    typer.Option(
        "--true-cfg-scale",
        help="True classifier-free guidance scale; > 1 runs the negative prompt too.",
        rich_help_panel=SAMPLING,
    ),
]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed (default: 42).", rich_help_panel=SAMPLING)]
GeneratorDevice = Annotated[
    str | None,
    typer.Option(
        "--generator-device",
        help="Where the noise is drawn: cpu (same images as diffusers' CPU generator) or cuda (default: cpu).",
        rich_help_panel=SAMPLING,
    ),
]
OutputsPerPrompt = Annotated[
    int | None,
    typer.Option("--num-outputs-per-prompt", help="Images per prompt (default: 1).", rich_help_panel=SAMPLING),
]
MaxSequenceLength = Annotated[
    int | None,
    typer.Option(
        "--max-sequence-length",
        help="Prompt tokens the text encoder reads: 1 to 512, HunyuanVideo-1.5 1000, Qwen-Image 1024 (default: the "
        "preset's).",
        rich_help_panel=SAMPLING,
    ),
]
VIDEO = "Video"
NumFrames = Annotated[
    int | None,
    typer.Option("--num-frames", help="Frames to generate, 4k+1 (default: the preset's).", rich_help_panel=VIDEO),
]
NumFramesRoundDown = Annotated[
    bool,
    typer.Option(
        "--num-frames-round-down", help="Round --num-frames down to the nearest 4k+1 instead of refusing it.",
        rich_help_panel=VIDEO,
    ),
]  # fmt: skip
Fps = Annotated[
    int | None,
    typer.Option("--fps", help="Frames per second of the MP4 (default: the preset's).", rich_help_panel=VIDEO),
]
GuidanceScale2 = Annotated[
    float | None,
    typer.Option(
        "--guidance-scale-2", help="Wan2.2 A14B: CFG scale of the low-noise expert (default: the preset's).",
        rich_help_panel=VIDEO,
    ),
]  # fmt: skip
FlowShift = Annotated[
    float | None,
    typer.Option(
        "--flow-shift", help="Flow-matching shift of the scheduler (default: the preset's).", rich_help_panel=VIDEO
    ),
]
ImagePath = Annotated[
    list[str] | None,
    typer.Option(
        "--image-path",
        help="An input image, a local file or an http(s) URL: image-to-video's first frame (Wan I2V, TI2V, "
        "HunyuanVideo-1.5 I2V), the image to edit (Qwen-Image-Edit); repeat the flag or separate paths with commas "
        "for several (Qwen-Image-Edit-2509 and -2511: up to 3).",
        metavar="<str>",
        rich_help_panel=SAMPLING,
    ),
]
OutputFormat = Annotated[
    OutputFormatChoice | None,
    typer.Option(
        "--output-format", help="png or mp4 (default: png for images, mp4 for videos; png for a video writes "
        "OUTPUT_PATH/NAME/frame_00000.png, ...).", rich_help_panel="Output",
    ),
]  # fmt: skip
SaveOutput = Annotated[
    bool, typer.Option("--save-output/--no-save-output", help="Write the images.", rich_help_panel=OUTPUT)
]
OutputPath = Annotated[Path, typer.Option("--output-path", help="Folder for the images.", rich_help_panel=OUTPUT)]
OutputFileName = Annotated[
    str | None,
    typer.Option(
        "--output-file-name",
        help="Write exactly OUTPUT_PATH/NAME.png (NAME_0.png, NAME_1.png, ... for several images).",
        rich_help_panel=OUTPUT,
    ),
]
PerfDumpPath = Annotated[
    Path | None,
    typer.Option(
        "--perf-dump-path", help="Write per-stage and per-step seconds and peak memory as JSON.", rich_help_panel=OUTPUT
    ),
]
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress or summary; print only the written paths.", rich_help_panel=OUTPUT),
]
Dtype = Annotated[
    str | None,
    typer.Option("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU).", rich_help_panel=RUNTIME),
]
Device = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if available).", rich_help_panel=RUNTIME),
]

PARALLEL = "Parallelism"
NumGpus = Annotated[
    int,
    typer.Option(
        "--num-gpus",
        min=1,
        help="Worker processes, one per GPU (with --device cpu: CPU processes). Under torchrun: its processes.",
        rich_help_panel=PARALLEL,
    ),
]
UlyssesDegree = Annotated[
    int | None,
    typer.Option(
        "--ulysses-degree",
        min=1,
        help="Ranks splitting the sequence by all-to-all over heads (default: the sequence degree / ring degree).",
        rich_help_panel=PARALLEL,
    ),
]
RingDegree = Annotated[
    int | None,
    typer.Option(
        "--ring-degree",
        min=1,
        help="Ranks passing K/V blocks round a ring (default 1); with --ulysses-degree: USP.",
        rich_help_panel=PARALLEL,
    ),
]
EnableCfgParallel = Annotated[
    bool,
    typer.Option(
        "--enable-cfg-parallel",
        help="Run the prompt and negative CFG branches on different ranks (needs CFG and an even --num-gpus).",
        rich_help_panel=PARALLEL,
    ),
]
AttentionBackend = Annotated[
    AttentionBackendChoice,
    typer.Option(
        "--attention-backend",
        help="Attention kernel: auto (the fastest this GPU has: cuDNN on Hopper, or FlashAttention where installed "
        "and measured faster), fa (FlashAttention: pip install 'sgdiff\\[flash]'), sdpa (PyTorch's choice), cudnn, "
        "flash (SDPA's), efficient, math, flex (compiled flex attention), fa3 (FlashAttention 3) and sage "
        "(SageAttention) when installed.",
        rich_help_panel=SPEED,
    ),
]
EnableFusedProjections = Annotated[
    bool | None,
    typer.Option(
        "--enable-fused-projections/--disable-fused-projections",
        help="Run the projections that read the same input (q, k, v; FLUX's single-block MLP input) as one GEMM. "
        "Default: on with --enable-torch-compile on a CUDA GPU in bf16, off otherwise (eagerly it is slower).",
        rich_help_panel=SPEED,
    ),
]
EnableFusedGelu = Annotated[
    bool | None,
    typer.Option(
        "--enable-fused-gelu/--disable-fused-gelu",
        help="Compute the MLPs' GELU inside the GEMM that feeds it (cuBLASLt epilogue on CUDA): one pass less "
        "over the widest activation. Default: on for a CUDA GPU in bf16, off elsewhere.",
        rich_help_panel=SPEED,
    ),
]
EnableFusedNorms = Annotated[
    bool | None,
    typer.Option(
        "--enable-fused-norms/--disable-fused-norms",
        help="Run q's and k's RMSNorm and rotary embedding as one Triton kernel per stream, and each adaLN "
        "LayerNorm + modulation as one more (CUDA, bf16). Default: on for a CUDA GPU in bf16 with Triton, "
        "off elsewhere.",
        rich_help_panel=SPEED,
    ),
]
EnableTorchCompile = Annotated[
    bool,
    typer.Option(
        "--enable-torch-compile",
        help="Compile each repeated transformer block once with torch.compile (the first step pays the compile time).",
        rich_help_panel=SPEED,
    ),
]
TorchCompileMode = Annotated[
    TorchCompileModeChoice | None,
    typer.Option(
        "--torch-compile-mode",
        help="With --enable-torch-compile: ahead (default) compiles each block kind once with AOTInductor into a "
        "program kept in the user's cache, which later runs load in milliseconds without the compiler (the first "
        "run compiles longer); just-in-time compiles at the first step of every process, its graphs from "
        "torch's disk cache after the first.",
        rich_help_panel=SPEED,
    ),
]
EnableCudaGraph = Annotated[
    bool,
    typer.Option(
        "--enable-cuda-graph",
        help="Replay the transformer's forward as a CUDA graph (captured on the first step; CUDA only).",
        rich_help_panel=SPEED,
    ),
]

Cache = Annotated[
    CacheChoice,
    typer.Option(
        "--cache",
        help="Skip the transformer's blocks on denoising steps where they would barely change the result, reusing "
        "what a computed step added (lossy, faster; each CFG branch its own cache): fbcache (First Block Cache: the "
        "first block's residual changed less than --cache-threshold since the last computed step, default 0.05), "
        "teacache (TeaCache: the first block's timestep-modulated input's accumulated change is below "
        "--cache-threshold, default 0.25), magcache (MagCache: the model's calibrated magnitude "
        "ratios' accumulated error is within --cache-threshold, default 0.06; FLUX.1-dev and Wan2.1 T2V) or "
        "taylorseer (TaylorSeer: one step in --cache-interval is computed, the others forecast what the blocks "
        "add from the last two computed steps). The first --cache-warmup-steps steps and the last one are always "
        "computed. recommended: the method and settings the model's preset recommends, measured on it (FLUX.1-dev "
        "and the demo models so far). Not with --enable-cuda-graph. Default: none.",
        rich_help_panel=SPEED,
    ),
]
CacheThreshold = Annotated[
    float | None,
    typer.Option(
        "--cache-threshold",
        help="With --cache: skip while the change stays below this (>= 0; 0 never skips; higher: faster, further "
        "from the uncached output). Default: fbcache 0.05, teacache 0.25, magcache 0.06; taylorseer has none "
        "(--cache-interval).",
        rich_help_panel=SPEED,
    ),
]
CacheWarmupSteps = Annotated[
    int | None,
    typer.Option(
        "--cache-warmup-steps",
        help="With --cache: the first N denoising steps always run every block (N >= 1). Default: 1; taylorseer 3; "
        "magcache 20% of the steps.",
        rich_help_panel=SPEED,
    ),
]
CacheInterval = Annotated[
    int | None,
    typer.Option(
        "--cache-interval",
        help="With --cache taylorseer: after the warm-up, compute one step in N and forecast the others (N >= 1; "
        "1 computes every step: the uncached output). Default: 5.",
        rich_help_panel=SPEED,
    ),
]

VaeTiling = Annotated[
    bool,
    typer.Option(
        "--vae-tiling",
        help="Decode in overlapping tiles, blended as diffusers' enable_tiling() does, and a batch one output at a "
        "time: less memory for large images and long videos. With --num-gpus the tiles are shared out over the "
        "GPUs (sgdiff's own VAEs: FLUX, Wan text-to-video).",
        rich_help_panel=RUNTIME,
    ),
]

DitPrecision = Annotated[
    DitPrecisionChoice,
    typer.Option(
        "--dit-precision",
        help="The transformer's weights: default (the model's --dtype) or fp8 (its blocks' Linear weights in "
        "float8 e4m3 with a scale per output channel, matmuls on FP8 tensor cores: half their memory, faster, "
        "lossy; a CUDA GPU of compute capability 8.9 or newer, bf16, without --enable-fused-gelu).",
        rich_help_panel=SPEED,
    ),
]

MEMORY = "Memory"

GpuMemoryLimit = Annotated[
    str | None,
    typer.Option(
        "--gpu-memory-limit",
        metavar="<size>",
        help="Let each process allocate at most this much of its GPU, e.g. 24GiB (also 24GB, 500MiB): a run that "
        "fits under the cap fits a card that size. Default: all of it.",
        rich_help_panel=MEMORY,
    ),
]


class CpuOffloadChoice(str, Enum):  # config.OFFLOAD_MODES (a test keeps them equal)
    none = "none"
    components = "components"
    layers = "layers"


CpuOffload = Annotated[
    CpuOffloadChoice,
    typer.Option(
        "--cpu-offload",
        help="Keep weights in CPU memory and copy them onto the GPU only while they run, exactly as they are (the "
        "outputs do not change): components (the text encoders, image encoder and VAE during their stage; of "
        "Wan2.2 A14B's two experts, the one running) or layers (components too, and the transformer's blocks "
        "copied in one by one while the previous block computes; not with --enable-cuda-graph). Default: none.",
        rich_help_panel=MEMORY,
    ),
]
TextEncoderOffload = Annotated[
    bool,
    typer.Option(
        "--text-encoder-offload",
        help="The text encoders leave the GPU once the prompt is encoded, and come back for the next prompt "
        "(part of --cpu-offload components and layers).",
        rich_help_panel=MEMORY,
    ),
]
OffloadPrefetch = Annotated[
    int,
    typer.Option(
        "--offload-prefetch",
        min=0,
        help="With --cpu-offload layers: how many blocks are copied ahead of the one computing (each holds one "
        "more block in GPU memory; 0: each block is copied when it runs). Default: 1.",
        rich_help_panel=MEMORY,
    ),
]
OffloadResidentBlocks = Annotated[
    str,
    typer.Option(
        "--offload-resident-blocks",
        metavar="auto|N",
        help="With --cpu-offload layers: how many of the streamed blocks stay on the GPU while the denoising "
        "runs (spread evenly; only the rest are copied at every step). auto: after the first step, as many as "
        "fit beside its memory under --gpu-memory-limit or the GPU's free memory; 0: every block streams. "
        "Default: auto.",
        rich_help_panel=MEMORY,
    ),
]


def resident_blocks(text: str) -> int | str:
    """--offload-resident-blocks as OffloadConfig takes it: "auto", a count, or the text as given (which the
    config refuses in one line)."""
    text = text.strip()
    return int(text) if text.isdigit() else text


LORA = "LoRA"


class LoraModeChoice(str, Enum):  # config.LORA_MODES (a test keeps them equal)
    auto = "auto"
    fused = "fused"
    unfused = "unfused"


LoraPath = Annotated[
    list[str] | None,
    typer.Option(
        "--lora-path",
        metavar="<path[:scale]>",
        help="A LoRA adapter for the transformer: a .safetensors file (diffusers/PEFT, kohya or the original "
        "trainers' names), a folder holding one, or a Hub repo id, then :SCALE if you like (default --lora-scale). "
        "Repeat for several (their updates add up). Requests name it by its file's stem (a folder's name, a repo id "
        "as given); with --server, give that name of an adapter the server loaded.",
        rich_help_panel=LORA,
    ),
]
LoraScale = Annotated[
    float | None,
    typer.Option(
        "--lora-scale",
        help="The scale of each --lora-path given without :SCALE (serve: what a request naming it without a "
        "scale gets). Default: 1.0.",
        rich_help_panel=LORA,
    ),
]
LoraMode = Annotated[
    LoraModeChoice | None,
    typer.Option(
        "--lora-mode",
        help="fused: the adapters added into the weights (no cost per step; generate: fixed at load; serve: fused "
        "anew from a copy of the base weights when a request picks others); unfused: kept beside them (a little "
        "work per step; a switch writes their scales). Default: auto, fused (serve with --cpu-offload or sequence "
        "parallelism: unfused).",
        rich_help_panel=LORA,
    ),
]


def speed_config(attention_backend: AttentionBackendChoice, projections: bool | None, gelu: bool | None,
                 norms: bool | None, compile_: bool, graph: bool,
                 precision: DitPrecisionChoice = DitPrecisionChoice.default, cache: CacheChoice = CacheChoice.none,
                 cache_threshold: float | None = None, cache_warmup_steps: int | None = None,
                 cache_interval: int | None = None, compile_mode: TorchCompileModeChoice | None = None):  # fmt: skip
    """The speed flags, shared by `generate` and `bench`, as the library's SpeedConfig."""
    from sgdiff.cli.errors import fail
    from sgdiff.config import SpeedConfig

    if compile_mode is not None and not compile_:
        fail(f"--torch-compile-mode {compile_mode.value} says how blocks are compiled: give --enable-torch-compile too")
    mode = (compile_mode or TorchCompileModeChoice.ahead).value
    return SpeedConfig(attention_backend.value, fused_projections=projections, fused_gelu=gelu, fused_norms=norms,
                       torch_compile=compile_, torch_compile_mode=mode, cuda_graph=graph, dit_precision=precision.value,
                       cache=cache.value, cache_threshold=cache_threshold, cache_warmup_steps=cache_warmup_steps,
                       cache_interval=cache_interval)  # fmt: skip


Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Send the requests to a running `sgdiff serve` at this URL (e.g. http://127.0.0.1:30000) instead of "
        "loading a model here; the outputs are written here as usual. The API key: SGDIFF_API_KEY.",
        rich_help_panel=MODEL,
    ),
]
