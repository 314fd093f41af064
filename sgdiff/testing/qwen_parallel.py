"""Qwen-Image on N CPU processes (gloo), for tests/test_qwen_image_parallel.py: run_on_ranks functions
(sgdiff/testing/distributed.py) that run the pipeline and the transformer sharded on an Edit-style
input under several parallel modes in one spawn."""

from __future__ import annotations

import math
from typing import Any

import torch

from sgdiff.config import ParallelConfig
from sgdiff.parallel.groups import ParallelGroups, build_groups
from sgdiff.testing.distributed import pipeline_output

# A transformer of 2 heads of 16 channels with zero_cond_t (Qwen-Image-Edit-2511's conditioning)
TINY_EDIT: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "axes_dims_rope": (4, 6, 6),
    "zero_cond_t": True,
}


def parallel_outputs(groups: ParallelGroups, modes: dict[str, ParallelConfig], request: tuple, edit_case: tuple):
    """Under each mode in turn (its own groups over the same processes, built in the same order on every
    rank; `groups` is unused), on a pipeline loaded for it: the request (model, prompt, flags) as
    pipeline_output gives it, and, where the mode splits the sequence, sharded_edit_transformer's
    result for edit_case (batch, grids, text length). A run_on_ranks function: one spawn for every mode."""
    outputs: dict[str, dict] = {}
    for name, config in modes.items():
        mode_groups = build_groups(config)
        outputs[name] = {"pipeline": pipeline_output(mode_groups, *request)}
        if mode_groups.sp_degree > 1:
            outputs[name]["transformer"] = sharded_edit_transformer(mode_groups, *edit_case)
    return outputs


def edit_inputs(batch: int, grids: list[tuple[int, int, int]], text_len: int) -> dict:
    """Random inputs of TINY_EDIT: the noise grid first, then the edit images' grids (seeded)."""
    g = torch.Generator().manual_seed(0)
    tokens = sum(math.prod(grid) for grid in grids)
    return dict(
        hidden_states=torch.randn(batch, tokens, TINY_EDIT["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TINY_EDIT["joint_attention_dim"], generator=g),
        timestep=torch.tensor([0.83, 0.31][:batch]),
        img_shapes=[grids] * batch,
    )


def sharded_edit_transformer(groups: ParallelGroups, batch: int, grids: list, text_len: int) -> dict:
    """TINY_EDIT (random weights, seeded: every rank builds the same) run whole, then sequence-parallel
    by the family's shard plan (twice), then whole again after `remove()` (a run_on_ranks function).
    Returns the whole output and each later output's largest difference from it."""
    from sgdiff.families.qwen_image import FAMILY
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig
    from sgdiff.parallel.plans import apply_sequence_parallel
    from sgdiff.testing.compare import randomize_weights

    torch.manual_seed(0)
    model = randomize_weights(QwenImageTransformer(QwenImageTransformerConfig(**TINY_EDIT)), seed=1)
    inputs = edit_inputs(batch, grids, text_len)
    with torch.no_grad():
        whole = model(**inputs)
        attn = apply_sequence_parallel([model], FAMILY, groups)
        with use_attention_impl(attn):
            sharded = [model(**inputs) for _ in range(2)]  # the second: layout and shards made anew
        attn.remove()
        again = model(**inputs)
    return dict(
        whole=whole,
        sharded=[(out - whole).abs().max().item() for out in sharded],
        after_remove=(again - whole).abs().max().item(),
    )
