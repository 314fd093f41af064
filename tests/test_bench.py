"""`sgdiff bench` on tiny models (the CPU check of the benchmark; real numbers come from a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sgdiff.bench.end_to_end import DEMO_MODELS
from sgdiff.bench.parts import BENCH_MODELS
from sgdiff.cli.bench import BenchModelChoice
from sgdiff.cli.main import app
from sgdiff.config import load_preset
from sgdiff.models.resolve import demo_model_dir
from sgdiff.testing.compare import relative_error

runner = CliRunner()


def test_bench_model_names_match_the_cli():
    assert [choice.value for choice in BenchModelChoice] == [*BENCH_MODELS, *DEMO_MODELS]


@pytest.mark.parametrize("model", ["flux.1-dev", "wan2.1-t2v-1.3b", "qwen-image", "qwen-image-edit"])
def test_bench_tiny_measures_both_implementations(model, tmp_path, monkeypatch):
    from sgdiff.bench import run
    from sgdiff.families.qwen_image import pipeline as qwen_pipeline

    guided = []  # each CFG combination of a step's two forwards (Qwen-Image's, rescaled, through the family's)
    for module in (run, qwen_pipeline):
        monkeypatch.setattr(module, "guided_velocity", lambda *args: guided.append(1) or args[0])
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "--model", model, "--tiny", "--repeat", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["model"] == model and data["tiny"] and data["tflop_per_forward"] > 0
    assert data["bf16_rel_err"] <= 1e-2
    for impl in ("diffusers", "sgdiff"):
        numbers = data[impl]
        assert numbers["forward_ms"] > 0 and numbers["step_ms"] > 0 and numbers["vae_decode_s"] > 0
        steps = BENCH_MODELS[model].steps
        expected = numbers["text_encoding_s"] + steps * numbers["step_ms"] / 1e3 + numbers["vae_decode_s"]
        assert numbers["end_to_end_s"] == pytest.approx(expected)
    assert bool(guided) == (not model.startswith("flux"))  # CFG: a Wan or Qwen-Image step is two forwards, FLUX's one
    table = result.output.splitlines()
    assert table[0].startswith(f"{model} 64x64") and any(line.startswith("transformer forward, ms") for line in table)


def test_bench_size_flags_set_the_output_size_and_are_checked(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "qwen-image", "--tiny", "--repeat", "1", "--warmup", "0", "--height", "32",
            "--width", "48", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["size"] == {"height": 32, "width": 48, "frames": 5}
    assert result.output.splitlines()[0].startswith("qwen-image 48x32")
    for flags, message in (
        (["--height", "40"], "--height must be a positive multiple of 16, got 40"),
        (["--width", "32", "--e2e"], "--height and --width size the per-forward bench"),
    ):
        result = runner.invoke(app, ["bench", "--model", "qwen-image", "--tiny", *flags])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_bench_qwen_image_edit_inputs_agree_and_each_phase_frees_the_last(monkeypatch):
    """Qwen-Image-Edit: the noise tokens and the input image's (two grids), the text as long as the text encoder's
    output after the template's prefix; the transformers are gone before the text encoder is built, and the text
    encoder before the VAE (at full size: 41 GB, then 17 GB)."""
    import gc

    import diffusers
    import transformers

    from sgdiff.bench import qwen_parts, run
    from sgdiff.config import SpeedConfig
    from sgdiff.models.qwen_image import QwenImageTransformer

    edit = BENCH_MODELS["qwen-image-edit"]
    assert qwen_parts.image_grids(edit, dict(height=1024, width=1024)) == [(1, 64, 64), (1, 64, 64)]
    assert qwen_parts.text_tokens(edit) == 336 and qwen_parts.text_tokens(BENCH_MODELS["qwen-image"]) == 133
    big = (diffusers.QwenImageTransformer2DModel, QwenImageTransformer, transformers.Qwen2_5_VLForConditionalGeneration)
    alive: dict[str, list[str]] = {}
    seen: dict[str, tuple] = {}

    def when(phase, build):
        def wrapped(*args):
            alive[phase] = [type(o).__name__ for o in gc.get_objects() if type(o) in big]  # (no gc.collect)
            return build(*args)

        return wrapped

    def inputs(*args, make=qwen_parts.transformer_inputs):
        made = make(*args)
        seen["inputs"] = (made["hidden_states"].shape, made["encoder_hidden_states"].shape, made["img_shapes"])
        return made

    def text_encoding(*args, build=run.build_text_encoding):
        encoders = build(*args)
        seen["text"] = tuple(encode().shape for encode in encoders.values())
        return encoders

    monkeypatch.setattr(qwen_parts, "transformer_inputs", inputs)
    monkeypatch.setattr(run, "build_text_encoding", when("text", text_encoding))
    monkeypatch.setattr(run, "build_decode", when("decode", run.build_decode))
    result = run.run_bench("qwen-image-edit", SpeedConfig(), tiny=True, warmup=0, repeat=1)
    assert alive == {"text": [], "decode": []}
    # tiny: 64x64 pixels, 4x4 tokens of 16 channels (4 latent channels in 2x2 patches) twice; 32-wide text
    assert seen["inputs"] == ((1, 32, 16), (1, 336, 32), [[(1, 4, 4), (1, 4, 4)]])
    assert seen["text"] == ((1, 336, 32), (1, 336, 32))  # diffusers' whole model and sgdiff's base model
    assert result["input_images"] == 1 and result["bf16_rel_err"] <= 1e-2


def test_bench_hunyuanvideo_sides_agree_and_its_text_stops_at_diffusers_layer():
    """HunyuanVideo (tiny): the two transformers agree on the same inputs (256 text tokens, embedded guidance);
    sgdiff's text encoder, cut after the layer diffusers reads, gives diffusers' hidden states of the prompt's
    tokens (diffusers': padded to 95 + 256 tokens, masked, the whole model run) and the same pooled CLIP text."""
    from sgdiff.bench import hunyuan_parts, run
    from sgdiff.config import SpeedConfig

    model, cpu = BENCH_MODELS["hunyuanvideo"], torch.device("cpu")
    encoders = hunyuan_parts.build_text_encoding(model, True, cpu)
    (theirs, theirs_pooled), (ours, ours_pooled) = encoders["diffusers"](), encoders["sgdiff"]()
    assert ours.shape == (1, hunyuan_parts.PROMPT_TOKENS, 32) and theirs.shape[1] == hunyuan_parts.TEXT_TOKENS
    assert relative_error(ours, theirs[:, : ours.shape[1]]) <= 1e-2 and torch.equal(ours_pooled, theirs_pooled)
    result = run.run_bench("hunyuanvideo", SpeedConfig(), tiny=True, warmup=0, repeat=1)
    assert result["bf16_rel_err"] <= 1e-2 and result["size"]["frames"] == 5
    assert "hunyuanvideo 64x64x5, 50 steps (TINY)" in run.render(result)


def test_bench_hunyuanvideo_15_sides_agree_on_diffusers_padded_inputs():
    """HunyuanVideo-1.5 (tiny): the transformers agree on diffusers' text-to-video inputs (padded Qwen and ByT5
    tokens with their masks, zero image embeddings; sgdiff's cuts them); sgdiff's text model, cut after the
    layer diffusers reads, gives diffusers' hidden states of the prompt's own tokens."""
    from sgdiff.bench import hunyuan15_parts, run
    from sgdiff.config import SpeedConfig

    model = BENCH_MODELS["hunyuanvideo-1.5"]
    encoders = hunyuan15_parts.build_text_encoding(model, True, torch.device("cpu"))
    theirs, ours = encoders["diffusers"](), encoders["sgdiff"]()
    assert ours.shape[1] == hunyuan15_parts.PROMPT_TOKENS and theirs.shape[1] == hunyuan15_parts.TEXT_TOKENS
    assert relative_error(ours, theirs[:, : ours.shape[1]]) <= 1e-2
    result = run.run_bench("hunyuanvideo-1.5", SpeedConfig(), tiny=True, warmup=0, repeat=1)
    assert result["bf16_rel_err"] <= 1e-2 and result["steps"] == 50


def test_bench_e2e_refuses_qwen_image_edit(tmp_path):
    args = ["bench", "--model", "qwen-image-edit", "--e2e", "--checkpoint-dir", str(tmp_path / "c")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --e2e does not run qwen-image-edit: the bench writes no Edit checkpoint nor input image yet "
        "(qwen-image --e2e runs the same transformer); without --e2e it times the forward, step, text encoding and "
        "decode"
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "demo-image runs with --e2e (shell to file, as `sgdiff generate` runs it); the per-forward bench builds "
             "full-size models, or --tiny ones"),
        (["--e2e", "--tiny"], "demo-image is the embedded model itself, small already: drop --tiny"),
        (["--e2e", "--checkpoint-dir", "c"], "demo-image runs from its embedded folder and writes no checkpoint: "
                                             "drop --checkpoint-dir"),
    ],
)  # fmt: skip
def test_bench_demo_models_run_end_to_end_only(flags, message):
    result = runner.invoke(app, ["bench", "--model", "demo-image", *flags])
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}"


@pytest.mark.slow
@pytest.mark.parametrize("model, suffix, size", [("demo-image", ".png", (128, 128)), ("demo-video", ".mp4", (64, 64))])
def test_bench_e2e_runs_a_demo_model_as_a_user_does(model, suffix, size, tmp_path, monkeypatch):
    """--e2e on an embedded demo model: `sgdiff generate --model-path sgdiff/demo-...` at the preset's size
    against diffusers' pipeline on the model's own folder; each side writes its file (checked before the
    bench's temporary folder goes)."""
    import imageio.v3 as iio

    import sgdiff.bench.end_to_end as e2e

    commands: list[list[str]] = []
    written: list[tuple[int, ...]] = []
    timed = e2e.timed

    def timed_and_checked(command):
        outcome = timed(command)
        out = Path(command[command.index("--output-path") + 1]) if "--output-path" in command else None
        folder = out or Path(json.loads(command[-1])["out"])
        files = sorted(folder.rglob(f"*{suffix}"))
        assert len(files) == 1, files
        written.append(iio.imread(files[0], index=0).shape[:2])
        commands.append(command)
        return outcome

    monkeypatch.setattr(e2e, "timed", timed_and_checked)
    out = tmp_path / "e2e.json"
    result = runner.invoke(app, ["bench", "--model", model, "--e2e", "--warmup", "0", "--repeat", "1", "--json",
                                 str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    preset = load_preset(model).sampling
    assert (data["height"], data["width"], data["steps"]) == (*size, preset["num_inference_steps"])
    assert data["max_sequence_length"] == preset["max_sequence_length"] == 32
    assert data["checkpoint"] == str(demo_model_dir(DEMO_MODELS[model]))
    diffusers_args, sgdiff_command = json.loads(commands[0][-1]), commands[1]
    assert diffusers_args["model"] == data["checkpoint"]
    assert sgdiff_command[sgdiff_command.index("--model-path") + 1] == f"sgdiff/{model}"
    assert written == [size, size]
    if model == "demo-video":
        assert (data["num_frames"], data["guidance_scale"], data["fps"]) == (9, 1.0, 8)
    assert f"{model} on cpu" in result.output and "shell -> file" in result.output and " MB" in result.output


@pytest.mark.slow
def test_bench_e2e_runs_qwen_image_with_true_cfg_on_both_sides(tmp_path, monkeypatch):
    """--e2e for Qwen-Image (tiny): both sides guide with true CFG 4 against the negative prompt " " (the
    diffusers script's call and sgdiff's flags say so) and write a PNG; sgdiff reads its text encoder
    without the vision tower."""
    import sgdiff.bench.end_to_end as e2e

    commands: list[list[str]] = []
    timed = e2e.timed
    monkeypatch.setattr(e2e, "timed", lambda command: commands.append(command) or timed(command))
    out, checkpoint = tmp_path / "e2e.json", tmp_path / "checkpoint"
    args = ["bench", "--model", "qwen-image", "--e2e", "--tiny", "--warmup", "0", "--repeat", "1",
            "--checkpoint-dir", str(checkpoint), "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["true_cfg"] == {"negative_prompt": " ", "true_cfg_scale": 4.0} and data["max_sequence_length"] == 512
    diffusers_args = json.loads(commands[0][-1])
    assert diffusers_args["true_cfg"] == data["true_cfg"]
    sgdiff_command = commands[1]
    assert sgdiff_command[sgdiff_command.index("--negative-prompt") + 1] == " "
    assert sgdiff_command[sgdiff_command.index("--true-cfg-scale") + 1] == "4.0"
    sgdiff, diffusers = data["runs"]["sgdiff"][0], data["runs"]["diffusers"][0]
    assert set(sgdiff["load_parts"]) == {"tokenizer", "text_encoder", "transformer", "vae", "prompt embeddings"}
    assert sgdiff["phases"]["denoise"] > 0 and diffusers["phases"]["write"] > 0 and sgdiff["phases"]["write"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_full_size_needs_a_gpu(tmp_path):
    result = runner.invoke(app, ["bench", "--model", "flux.1-dev", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: sgdiff bench builds full-size models and needs a CUDA GPU; --tiny checks it on a CPU"
    )
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_bench_e2e_times_both_sides_as_fresh_processes(tmp_path):
    """--e2e on the tiny checkpoint (written once): `sgdiff generate` with the speed flags given, and the
    diffusers script, each as its own process; the phases of each add up to no more than its wall time."""
    out, checkpoint = tmp_path / "e2e.json", tmp_path / "checkpoint"
    args = ["bench", "--model", "flux.1-dev", "--e2e", "--tiny", "--warmup", "0", "--repeat", "1", "--prompts", "2",
            "--checkpoint-dir", str(checkpoint), "--json", str(out), "--enable-fused-gelu"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert (checkpoint / "model_index.json").is_file() and data["checkpoint_gb"] > 0
    assert data["speed_flags"] == ["--enable-fused-gelu"] and data["prompts"] == 2
    sgdiff, diffusers = data["runs"]["sgdiff"][0], data["runs"]["diffusers"][0]
    assert set(sgdiff["phases"]) == {"start-up", "load", "text", "denoise", "decode", "write", "exit"}
    assert set(diffusers["phases"]) == {"start-up", "load", "text + denoise + decode", "write", "exit"}
    for run in (sgdiff, diffusers):
        assert all(seconds >= 0 for seconds in run["phases"].values()) and run["phases"]["load"] > 0
        assert sum(run["phases"].values()) <= run["wall"] + 0.02  # the kernel counts a process's start in 10 ms ticks
    assert sgdiff["phases"]["denoise"] > 0 and "shell -> file" in result.output
    requests = sgdiff["request_seconds"]  # each prompt's request in the engine: text, denoise, decode
    in_requests = sum(sgdiff["phases"][phase] for phase in ("text", "denoise", "decode"))
    assert len(requests) == 2 and in_requests <= sum(requests) + 1e-6 and "later ones median" in result.output
    parts = {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "prompt embeddings"}
    assert set(sgdiff["load_parts"]) == parts  # (the prompts, encoded while the transformer loads)
    assert all(0 <= began <= ended <= sgdiff["phases"]["load"] + 0.01 for began, ended in sgdiff["load_parts"].values())
    assert data["machine"]["read_gb_per_s"] > 0 and "this machine reads the files at" in result.output


@pytest.mark.slow
def test_bench_e2e_sgdiff_only_runs_no_diffusers_script(tmp_path):
    out, checkpoint = tmp_path / "e2e.json", tmp_path / "checkpoint"
    args = ["bench", "--model", "flux.1-dev", "--e2e", "--tiny", "--warmup", "0", "--repeat", "1", "--sgdiff-only",
            "--checkpoint-dir", str(checkpoint), "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert list(json.loads(out.read_text())["runs"]) == ["sgdiff"]
    assert "(diffusers not run)" in result.output and result.output.count("diffusers") == 1


def test_sgdiff_only_needs_e2e(tmp_path):
    result = runner.invoke(app, ["bench", "--model", "flux.1-dev", "--tiny", "--sgdiff-only"])
    assert result.exit_code == 2 and "--sgdiff-only leaves diffusers' script out of --e2e's runs" in result.output


@pytest.mark.slow
def test_bench_e2e_runs_a_video_model_to_an_mp4_on_both_sides(tmp_path):
    """--e2e for Wan2.1-T2V-1.3B (tiny): both sides sample the same frames with CFG and write an MP4."""
    out, checkpoint = tmp_path / "e2e.json", tmp_path / "checkpoint"
    args = ["bench", "--model", "wan2.1-t2v-1.3b", "--e2e", "--tiny", "--warmup", "0", "--repeat", "1",
            "--checkpoint-dir", str(checkpoint), "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert (data["num_frames"], data["guidance_scale"], data["fps"]) == (9, 5.0, 16)
    sgdiff, diffusers = data["runs"]["sgdiff"][0], data["runs"]["diffusers"][0]
    assert set(sgdiff["load_parts"]) == {"tokenizer", "text_encoder", "transformer", "vae", "prompt embeddings"}
    assert sgdiff["phases"]["denoise"] > 0 and diffusers["phases"]["write"] > 0 and sgdiff["phases"]["write"] > 0
