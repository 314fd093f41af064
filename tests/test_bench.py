"""`sgdiff bench` on tiny models (the CPU check of the benchmark; real numbers come from a GPU)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sgdiff.bench.parts import BENCH_MODELS
from sgdiff.cli.bench import BenchModelChoice
from sgdiff.cli.main import app

runner = CliRunner()


def test_bench_model_names_match_the_cli():
    assert [choice.value for choice in BenchModelChoice] == list(BENCH_MODELS)


@pytest.mark.parametrize("model", ["flux.1-dev", "wan2.1-t2v-1.3b"])
def test_bench_tiny_measures_both_implementations(model, tmp_path, monkeypatch):
    from sgdiff.bench import run

    guided = []  # each CFG combination of a step's two forwards
    monkeypatch.setattr(run, "guided_velocity", lambda *args: guided.append(1) or args[0])
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
    assert bool(guided) == model.startswith("wan")  # CFG: a Wan step is two forwards, a FLUX step one
    table = result.output.splitlines()
    assert table[0].startswith(f"{model} 64x64") and any(line.startswith("transformer forward, ms") for line in table)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_full_size_needs_a_gpu(tmp_path):
    result = runner.invoke(app, ["bench", "--model", "flux.1-dev", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: sgdiff bench builds full-size models and needs a CUDA GPU; --tiny checks it on a CPU"
    )
    assert not (tmp_path / "b.json").exists()


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
    parts = {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "prompt embeddings"}
    assert set(sgdiff["load_parts"]) == parts  # (the prompts, encoded while the transformer loads)
    assert all(0 <= began <= ended <= sgdiff["phases"]["load"] + 0.01 for began, ended in sgdiff["load_parts"].values())
    assert data["machine"]["read_gb_per_s"] > 0 and "this machine reads the files at" in result.output


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
