"""HunyuanVideo on N CPU processes (gloo), for tests/test_hunyuan_video_parallel.py: run_on_ranks functions
(sgdiff/testing/distributed.py) that run the pipeline and the transformer sharded by the family's plan
(families/hunyuan_video/shard.py) under several parallel modes in one spawn."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from sgdiff.config import ParallelConfig
from sgdiff.parallel.groups import ParallelGroups, build_groups
from sgdiff.testing.distributed import pipeline_output

# A transformer of 2 heads of 16 channels with embedded guidance: 2 dual-stream and 2 single-stream blocks
TINY: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "text_embed_dim": 24,
    "pooled_projection_dim": 12,
    "rope_axes_dim": (4, 6, 6),
}


def parallel_outputs(groups: ParallelGroups, modes: dict[str, ParallelConfig], request: tuple, cases: dict) -> dict:
    """Under each mode in turn (its own groups over the same processes, built in the same order on every
    rank; `groups` is unused): the request (model, prompt, flags) as pipeline_output gives it, and, where
    the mode splits the sequence, sharded_transformer's result for each of `cases` (name -> its arguments).
    A run_on_ranks function: one spawn for every mode."""
    outputs: dict[str, dict] = {}
    for name, config in modes.items():
        mode_groups = build_groups(config)
        outputs[name] = {"pipeline": pipeline_output(mode_groups, *request)}
        if mode_groups.sp_degree > 1:
            sharded = {case: sharded_transformer(mode_groups, *args) for case, args in cases.items()}
            outputs[name]["transformer"] = sharded
    return outputs


def transformer_inputs(batch: int, latent_shape: tuple[int, int, int], text_len: int) -> dict:
    """Random inputs of TINY (seeded): latents [B, C, F, H, W] of latent_shape (F, H, W), text_len tokens."""
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, TINY["in_channels"], *latent_shape, generator=g),
        timestep=torch.tensor([830.0, 310.0][:batch]),
        encoder_hidden_states=torch.randn(batch, text_len, TINY["text_embed_dim"], generator=g),
        pooled_projections=torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        guidance=torch.tensor([6000.0, 3500.0][:batch]),
    )


def sharded_transformer(
    groups: ParallelGroups, batch: int, latent_shape: tuple[int, int, int], text_len: int, single_layers: int = 2
) -> dict:
    """TINY with `single_layers` single-stream blocks (random weights, seeded: every rank builds the same)
    run whole, then sequence-parallel by the family's shard plan (twice), then whole again after `remove()`
    (a run_on_ranks function). Returns the whole output, each later output's largest difference from it,
    and the video tokens each rank's proj_out ran on (its share; the whole video when not sharded)."""
    from sgdiff.families.hunyuan_video import FAMILY
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.models.hunyuan_video import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
    from sgdiff.parallel.plans import apply_sequence_parallel
    from sgdiff.testing.compare import randomize_weights

    config = replace(HunyuanVideoTransformerConfig(**TINY), num_single_layers=single_layers)
    torch.manual_seed(0)
    model = HunyuanVideoTransformer(config)
    randomize_weights(model, seed=1)  # (and eval mode)
    inputs = transformer_inputs(batch, latent_shape, text_len)
    out_tokens: list[int] = []
    model.proj_out.register_forward_pre_hook(lambda module, args: out_tokens.append(args[0].shape[1]))
    with torch.no_grad():
        whole = model(**inputs)
        attn = apply_sequence_parallel([model], FAMILY, groups)
        with use_attention_impl(attn):
            sharded = [model(**inputs) for _ in range(2)]  # the second: layout and shards made anew
        attn.remove()
        again = model(**inputs)
    video_tokens = math.prod(latent_shape) // config.patch_size**2 // config.patch_size_t
    assert out_tokens[0] == out_tokens[-1] == video_tokens  # (whole: every video token)
    return dict(
        whole=whole,
        sharded=[(out - whole).abs().max().item() for out in sharded],
        after_remove=(again - whole).abs().max().item(),
        proj_out_tokens=out_tokens[1],
    )
