"""The composed pipeline: stage order, parallel declarations, registry and packaging."""

from __future__ import annotations

from pathlib import Path

import torch

from sgdiff.config import tomllib
from sgdiff.engine.runner import ModelRunner
from sgdiff.families.flux import FAMILY as FLUX
from sgdiff.models.attention import attention
from sgdiff.pipeline.base import ParallelMode
from sgdiff.pipeline.registry import inspect_model

ROOT = Path(__file__).resolve().parents[1]


def test_flux_pipeline_stages_in_order_with_parallel_modes(tiny_flux_dev):
    engine = ModelRunner(str(tiny_flux_dev))
    engine.load()
    declared = [(stage.name, stage.parallel) for stage in engine.pipeline.stages]
    assert declared == [
        ("input_validation", ParallelMode.ALL_RANKS),
        ("text_encoding", ParallelMode.RANK0_ONLY),
        ("timesteps", ParallelMode.ALL_RANKS),
        ("latents", ParallelMode.ALL_RANKS),
        ("denoising", ParallelMode.CFG_SPLIT),
        ("decoding", ParallelMode.TILE_SPLIT),  # sgdiff's own VAE: its tiles shared out over the ranks
    ]


def test_registry_reads_model_index(tiny_flux_schnell):
    info = inspect_model(tiny_flux_schnell)
    assert info.pipeline_class == "FluxPipeline" and info.family is FLUX
    assert info.transformer_config["guidance_embeds"] is False
    assert info.scheduler_config["use_dynamic_shifting"] is False


def test_every_attention_call_goes_through_the_one_entry_point(tiny_flux_dev):
    engine = ModelRunner(str(tiny_flux_dev))
    calls = []

    def recording_attention(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    engine.load()
    engine.pipeline.attention = recording_attention  # what --attention-backend and parallel/ set
    engine.generate(engine.sampling_params("p", height=32, width=32, num_inference_steps=1))
    assert len(calls) == 4  # 2 double + 2 single blocks, one step, no CFG
    q = torch.randn(1, 5, 2, 8)
    assert torch.equal(attention(q, q, q), recording_attention(q, q, q))  # the default is restored


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sgdiff").rglob("__init__.py")}
    assert on_disk | {"sgdiff.presets"} == listed


def test_model_code_never_imports_torch_distributed():
    """Nor does a family's folder: its shard plan goes through sgdiff.parallel."""
    for folder in ("models", "families"):
        for path in (ROOT / "sgdiff" / folder).rglob("*.py"):
            assert "torch.distributed" not in path.read_text(), path
