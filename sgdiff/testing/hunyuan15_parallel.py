"""HunyuanVideo-1.5 on N CPU processes (gloo), for tests/test_hunyuan_video15_parallel.py: run_on_ranks functions
(sgdiff/testing/distributed.py) that run the pipeline and the transformer sharded by the family's plan
(families/hunyuan_video15/shard.py) under several parallel modes in one spawn."""

from __future__ import annotations

import math
from typing import Any

import torch

from sgdiff.config import ParallelConfig
from sgdiff.parallel.groups import ParallelGroups, build_groups
from sgdiff.testing.distributed import pipeline_output

# A transformer of 2 heads of 16 channels, 2 blocks, a 1-layer refiner (tiny_hunyuan_video15's but for its widths)
TINY: dict[str, Any] = {
    "in_channels": 9,  # the noise (4), the condition latents (4) and their mask
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_refiner_layers": 1,
    "text_embed_dim": 12,
    "text_embed_2_dim": 10,
    "image_embed_dim": 8,
    "rope_axes_dim": (4, 6, 6),
}
PADDED = {"text": 10, "glyphs": 6, "image": 5}  # the inputs' padded lengths (the pipelines': 1000, 256, 729)


def parallel_outputs(groups: ParallelGroups, modes: dict[str, ParallelConfig], requests: list, cases: dict) -> dict:
    """Under each mode in turn (its own groups over the same processes, built in the same order on every
    rank; `groups` is unused): each request (model, prompt, flags) as pipeline_output gives it, and, where
    the mode splits the sequence, sharded_transformer's result for each of `cases` (name -> its arguments).
    A run_on_ranks function: one spawn for every mode."""
    outputs: dict[str, dict] = {}
    for name, config in modes.items():
        mode_groups = build_groups(config)
        outputs[name] = {"pipeline": [pipeline_output(mode_groups, *request) for request in requests]}
        if mode_groups.sp_degree > 1:
            sharded = {case: sharded_transformer(mode_groups, *args) for case, args in cases.items()}
            outputs[name]["transformer"] = sharded
    return outputs


def padding_mask(counts: list[int], length: int) -> torch.Tensor:
    """[B, length]: each row's first `count` ones (the tokenizers pad on the right)."""
    return (torch.arange(length)[None, :] < torch.tensor(counts)[:, None]).float()


def transformer_inputs(
    latent_shape: tuple[int, int, int], text_counts: list[int], glyph_counts: list[int], image: bool
) -> dict:
    """Random inputs of TINY (seeded), padded and masked as diffusers' pipelines pass them: latents [B, C, F, H,
    W] of latent_shape (F, H, W); per row its valid prompt and glyph tokens; SigLIP tokens where `image`."""
    g = torch.Generator().manual_seed(0)
    batch = len(text_counts)
    hidden = torch.randn(batch, TINY["in_channels"], *latent_shape, generator=g)
    glyph_mask = padding_mask(glyph_counts, PADDED["glyphs"])
    glyphs = torch.randn(batch, PADDED["glyphs"], TINY["text_embed_2_dim"], generator=g)
    image_embeds = torch.randn(1, PADDED["image"], TINY["image_embed_dim"], generator=g).expand(batch, -1, -1)
    return dict(
        hidden_states=hidden,
        timestep=torch.tensor([830.0, 310.0][:batch]),
        encoder_hidden_states=torch.randn(batch, PADDED["text"], TINY["text_embed_dim"], generator=g),
        encoder_attention_mask=padding_mask(text_counts, PADDED["text"]),
        encoder_hidden_states_2=glyphs * glyph_mask.any(1)[:, None, None],  # a row quoting nothing: zeros
        encoder_attention_mask_2=glyph_mask,
        image_embeds=image_embeds if image else torch.zeros_like(image_embeds),  # zeros: T2V
    )


def sharded_transformer(
    groups: ParallelGroups,
    latent_shape: tuple[int, int, int],
    text_counts: list[int],
    glyph_counts: list[int],
    image: bool,
) -> dict:
    """TINY (random weights, seeded: every rank builds the same) run whole, then sequence-parallel by the family's
    shard plan (twice), then whole again after `remove()` (a run_on_ranks function). Returns the whole output,
    each later output's largest difference from it, and the video tokens each rank's proj_out ran on in each
    forward of the sharded call (one forward per group of rows with equal valid token counts)."""
    from sgdiff.families.hunyuan_video15 import FAMILY
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.models.hunyuan_video15 import HunyuanVideo15Transformer, HunyuanVideo15TransformerConfig
    from sgdiff.parallel.plans import apply_sequence_parallel
    from sgdiff.testing.compare import randomize_weights

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer(HunyuanVideo15TransformerConfig(**TINY))
    randomize_weights(model, seed=1, unscaled=("cond_type_embed",))  # (and eval mode)
    inputs = transformer_inputs(latent_shape, text_counts, glyph_counts, image)
    out_tokens: list[int] = []
    model.proj_out.register_forward_pre_hook(lambda module, args: out_tokens.append(args[0].shape[1]))
    with torch.no_grad():
        whole = model(**inputs)
        forwards = len(out_tokens)
        attn = apply_sequence_parallel([model], FAMILY, groups)
        with use_attention_impl(attn):
            sharded = [model(**inputs) for _ in range(2)]  # the second: layout and shards made anew
        attn.remove()
        again = model(**inputs)
    video_tokens = math.prod(latent_shape)  # (1x1x1 patches)
    assert out_tokens[:forwards] == out_tokens[-forwards:] == [video_tokens] * forwards  # (whole: every token)
    return dict(
        whole=whole,
        sharded=[(out - whole).abs().max().item() for out in sharded],
        after_remove=(again - whole).abs().max().item(),
        proj_out_tokens=out_tokens[forwards : 2 * forwards],
    )
