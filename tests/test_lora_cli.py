"""`sgdiff generate --lora-path`: the outputs are diffusers' (load_lora_weights + set_adapters, fp32 CPU) for
FLUX.1, Qwen-Image and Wan2.2 A14B (into `transformer` only, diffusers' default), fused or unfused; --lora-scale is the
scale of paths without :SCALE; the PNG metadata and the perf dump record the adapters; two CPU processes
(Ulysses, fused; CFG parallel, unfused) write the one process's image; bad input ends in one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.io.image import read_png_parameters
from sgdiff.io.video import read_png_frames
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.testing.lora_files import diffusers_file, flux_style_and_detail, linear_names, original_file
from sgdiff.testing.tiny_qwen_image import build_tiny_qwen_image

runner = CliRunner()
MAX_PIXEL_DIFF = 2  # of 255
MOVED = 20 * MAX_PIXEL_DIFF  # the adapters move the output by more than this
FLUX_REQUEST = dict(prompt="a red cube", height=32, width=48, num_inference_steps=3, guidance_scale=4.0)
FLUX_FLAGS = ["--prompt", "a red cube", "--height", "32", "--width", "48", "--steps", "3", "--guidance-scale", "4.0",
              "--seed", "7", "--device", "cpu", "--dtype", "fp32", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def flux_adapters(tiny_flux_dev, tmp_path_factory):
    """`style` (attention, alpha 8) and `detail` (the MLPs) for the tiny FLUX.1-dev, in diffusers' names."""
    return flux_style_and_detail(tiny_flux_dev / "transformer", tmp_path_factory.mktemp("lora-cli"))


def generate(tmp_path, model, *args: str):
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "--model-path", str(model), "--output-path", str(out), *args])
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.splitlines() if line]


def png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)


def diffusers_flux(model, adapters: list[tuple]) -> np.ndarray:
    """diffusers' image with `adapters` ((file, scale), ...) loaded and set, as 0..255 integers."""
    from diffusers import FluxPipeline

    with quiet_libraries():
        pipe = FluxPipeline.from_pretrained(model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for index, (path, _) in enumerate(adapters):
            pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
        if adapters:
            pipe.set_adapters([f"a{i}" for i in range(len(adapters))], [scale for _, scale in adapters])
        image = pipe(generator=torch.Generator().manual_seed(7), output_type="np", **FLUX_REQUEST).images[0]
    return (image * 255).round().astype(np.int64)


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_flux_image_with_adapters_is_diffusers(tiny_flux_dev, flux_adapters, tmp_path, mode):
    """`--lora-path style:1.5 --lora-path detail --lora-scale 1.2`: style at 1.5, detail at --lora-scale's 1.2."""
    dump = tmp_path / "perf.json"
    style, detail = flux_adapters["style"], flux_adapters["detail"]
    [path] = generate(tmp_path, tiny_flux_dev, *FLUX_FLAGS, "--lora-path", f"{style}:1.5", "--lora-path", str(detail),
                      "--lora-scale", "1.2", "--lora-mode", mode, "--perf-dump-path", str(dump))  # fmt: skip
    expected = diffusers_flux(tiny_flux_dev, [(style, 1.5), (detail, 1.2)])
    image = png(path)
    assert np.abs(image - expected).max() <= MAX_PIXEL_DIFF
    assert np.abs(image - diffusers_flux(tiny_flux_dev, [])).max() > MOVED
    used = [{"name": "style", "source": str(style), "scale": 1.5},
            {"name": "detail", "source": str(detail), "scale": 1.2}]  # fmt: skip
    assert read_png_parameters(path)["loras"] == used
    report = json.loads(dump.read_text())
    assert report["schema_version"] == 4 and report["requests"][0]["loras"] == used
    assert [(a["name"], a["scale"], a["rank"], a["mode"]) for a in report["loras"]] == [
        ("style", 1.5, 4, mode),
        ("detail", 1.2, 4, mode),
    ]
    assert report["loras"][0]["layers"] == len(linear_names(load_diffusers_flux(tiny_flux_dev), "attn"))


def load_diffusers_flux(model):
    from diffusers import FluxTransformer2DModel

    with quiet_libraries():
        return FluxTransformer2DModel.from_pretrained(model / "transformer")


def test_wan_a14b_adapters_go_into_transformer_as_diffusers_loads_them(tiny_wan, tmp_path):
    """Wan2.2 A14B: the adapter updates `transformer` (the high-noise expert), not `transformer_2`, as diffusers'
    load_lora_weights does unless asked (load_into_transformer_2); the frames are diffusers'."""
    from diffusers import WanPipeline, WanTransformer3DModel

    model = tiny_wan("t2v-a14b")
    with quiet_libraries():
        reference = WanTransformer3DModel.from_pretrained(model / "transformer")
    adapter = diffusers_file(tmp_path / "motion.safetensors", reference, linear_names(reference, "blocks."), 5)
    request = dict(prompt="a red cube", negative_prompt="blurry", height=32, width=32, num_frames=5,
                   num_inference_steps=3, guidance_scale=4.0, guidance_scale_2=2.0)  # fmt: skip
    flags = ["--prompt", "a red cube", "--negative-prompt", "blurry", "--height", "32", "--width", "32", "--num-frames",
             "5", "--steps", "3", "--guidance-scale", "4.0", "--guidance-scale-2", "2.0", "--seed", "3",
             "--output-format", "png", "-q", "--lora-path", f"{adapter}:2.0"]  # fmt: skip
    [folder] = generate(tmp_path, model, *flags)
    with quiet_libraries():
        pipe = WanPipeline.from_pretrained(model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(generator=torch.Generator().manual_seed(3), output_type="np", **request).frames[0]  # noqa: E731
        base = (run() * 255).round().astype(np.int64)
        pipe.load_lora_weights(str(adapter), adapter_name="motion")
        pipe.set_adapters(["motion"], [2.0])
        expected = (run() * 255).round().astype(np.int64)
    frames = read_png_frames(__import__("pathlib").Path(folder)).astype(np.int64)
    assert np.abs(frames - expected).max() <= MAX_PIXEL_DIFF
    assert np.abs(base - expected).max() > 5 * MAX_PIXEL_DIFF  # (the tiny Wan moves less than FLUX)


def test_qwen_image_adapters_in_diffusers_and_kohya_names_are_diffusers(tmp_path_factory, tmp_path):
    """Qwen-Image: `style` in diffusers' names (alpha 8 in the metadata), `detail` in its trainers' kohya names
    (`lora_unet_transformer_blocks_0_img_mlp_net_0_proj`, alpha 2); the image is diffusers'."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    model = build_tiny_qwen_image(tmp_path_factory.mktemp("qwen-image") / "tiny")
    with quiet_libraries():
        reference = QwenImageTransformer2DModel.from_pretrained(model / "transformer")
    style = diffusers_file(tmp_path / "style.safetensors", reference, linear_names(reference, "attn"), 5,
                           metadata_alpha=8.0)  # fmt: skip
    mlps = dict.fromkeys(linear_names(reference, "mlp"), 2.0)
    detail = original_file(tmp_path / "detail.safetensors", reference, mlps, 6, "lora_unet_", True)
    request = dict(prompt="a red cube", height=48, width=80, num_inference_steps=3)
    flags = ["--prompt", "a red cube", "--height", "48", "--width", "80", "--steps", "3", "--seed", "7",
             "--device", "cpu", "--dtype", "fp32", "-q", "--lora-path", f"{style}:0.8", "--lora-path",
             f"{detail}:-1.2"]  # fmt: skip
    [path] = generate(tmp_path, model, *flags)
    with quiet_libraries():
        pipe = QwenImagePipeline.from_pretrained(model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(generator=torch.Generator().manual_seed(7), output_type="np", **request).images[0]  # noqa: E731
        base = (run() * 255).round().astype(np.int64)
        pipe.load_lora_weights(str(style), adapter_name="style")
        pipe.load_lora_weights(str(detail), adapter_name="detail")
        pipe.set_adapters(["style", "detail"], [0.8, -1.2])
        expected = (run() * 255).round().astype(np.int64)
    assert np.abs(png(path) - expected).max() <= MAX_PIXEL_DIFF
    assert np.abs(base - expected).max() > MOVED


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parallel", "mode"),
    [
        (["--num-gpus", "2"], "fused"),
        (["--num-gpus", "2"], "unfused"),
        (["--num-gpus", "2", "--enable-cfg-parallel"], "unfused"),
    ],
    ids=["ulysses-2-fused", "ulysses-2-unfused", "cfg-parallel-unfused"],
)
def test_two_processes_write_the_one_process_image(tiny_flux_dev, flux_adapters, tmp_path, parallel, mode):
    """Fused adapters are in the weights before the sequence-parallel plans cut them (each rank's q/k/v rows,
    the modulation); unfused ones add their updates of what each rank computes; CFG parallel cuts nothing."""
    style, detail = flux_adapters["style"], flux_adapters["detail"]
    flags = [*FLUX_FLAGS, "--negative-prompt", "blurry", "--true-cfg-scale", "3.0", "--lora-mode", mode,
             "--lora-path", f"{style}:1.5", "--lora-path", f"{detail}:-1.2"]  # fmt: skip
    [alone] = generate(tmp_path / "one", tiny_flux_dev, *flags)
    [split] = generate(tmp_path / "two", tiny_flux_dev, *flags, *parallel)
    assert np.abs(png(alone) - png(split)).max() <= 1
    if mode == "fused":  # (the adapters move the image: once is enough)
        [base] = generate(tmp_path / "base", tiny_flux_dev, *flags[: flags.index("--lora-mode")])
        assert np.abs(png(alone) - png(base)).max() > MOVED


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_offloaded_blocks_carry_their_adapters(tiny_flux_dev, flux_adapters, tmp_path, mode):
    """The adapters go on before offloading: with --cpu-offload layers (each block's weights, and its unfused
    factors, copied in as it runs) the image is the one of the model held whole, exactly."""
    flags = [*FLUX_FLAGS, "--lora-mode", mode, "--lora-path", f"{flux_adapters['style']}:1.5"]
    [whole] = generate(tmp_path / "whole", tiny_flux_dev, *flags)
    [streamed] = generate(tmp_path / "streamed", tiny_flux_dev, *flags, "--cpu-offload", "layers")
    assert np.array_equal(png(whole), png(streamed))


def refused(tmp_path, model, *args: str) -> str:
    """The one line a refused run prints; nothing is written."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "--model-path", str(model), "--output-path", str(out), *FLUX_FLAGS, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def test_bad_adapters_and_flags_are_refused_in_one_line(tiny_flux_dev, tiny_wan, flux_adapters, tmp_path):
    style = str(flux_adapters["style"])
    missing = tmp_path / "nowhere.safetensors"
    assert refused(tmp_path, tiny_flux_dev, "--lora-path", str(missing)) == (
        f"--lora-path {missing} does not exist (and is not a Hub repo id like owner/name)"
    )
    torch.save({"transformer.x.lora_A.weight": torch.zeros(2, 3)}, tmp_path / "pickled.safetensors")
    assert "is a pickle file; sgdiff loads LoRA adapters from .safetensors only" in refused(
        tmp_path, tiny_flux_dev, "--lora-path", str(tmp_path / "pickled.safetensors")
    )
    assert refused(tmp_path, tiny_flux_dev, "--lora-path", f"{style}:nan") == (
        f"--lora-path {style}:nan: the scale nan is not a finite number"
    )
    wan = tiny_wan("t2v")  # an adapter of another model fits no layer of this one (found once it has loaded)
    from diffusers import WanTransformer3DModel

    with quiet_libraries():
        reference = WanTransformer3DModel.from_pretrained(wan / "transformer")
    wan_adapter = diffusers_file(tmp_path / "wan.safetensors", reference, linear_names(reference, "blocks.0."), 1)
    assert refused(tmp_path, tiny_flux_dev, "--lora-path", str(wan_adapter)).startswith(
        f"the LoRA file {wan_adapter} fits no layer of this FluxTransformer: "
    )
    assert refused(tmp_path, tiny_flux_dev, "--lora-scale", "0.5") == (
        "--lora-scale sets the scale of the --lora-path adapters: give --lora-path too"
    )
    assert refused(tmp_path, tiny_flux_dev, "--lora-mode", "unfused") == (
        "--lora-mode unfused says how LoRA adapters are applied: give --lora-path too"
    )
    assert "every one has its own: leave --lora-scale out" in refused(
        tmp_path, tiny_flux_dev, "--lora-path", f"{style}:0.5", "--lora-scale", "0.7"
    )
    assert refused(tmp_path, tiny_flux_dev, "--lora-path", style, "--lora-path", style) == (
        f"--lora-path {style} and {style} are both named 'style', the name requests use: rename one of the files"
    )
