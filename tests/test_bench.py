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
