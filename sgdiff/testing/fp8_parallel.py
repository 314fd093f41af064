"""A rank function (sgdiff/testing/distributed.py run_on_ranks) for --dit-precision fp8 under sequence
parallelism: the FP8 math is emulated on the CPU, the parallel code is the GPUs' own."""

from __future__ import annotations

from dataclasses import replace

import torch

from sgdiff.parallel.groups import ParallelGroups


def sharded_fp8_flux(groups: ParallelGroups, batch: int) -> dict:
    """The tiny FLUX transformer (float32, seeded: every rank builds the same) with FP8 weights, run whole
    and then sequence-parallel (its modulation shared out over the ranks: parallel/modulation.py; under
    Ulysses-2 the joint attention's own exchange, parallel/sequence.py over_streams). Returns the largest
    difference of the sharded output from the whole one and how many FP8 modulation Linears this rank
    computed rows of."""
    from sgdiff.bench.parts import TINY_FLUX
    from sgdiff.families.flux import FAMILY as FLUX
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.models.flux import FluxTransformer
    from sgdiff.models.flux.packing import image_position_ids, text_position_ids
    from sgdiff.parallel.modulation import ShardedModulation
    from sgdiff.parallel.plans import apply_sequence_parallel
    from sgdiff.speed.fp8 import use_fp8_weights

    torch.manual_seed(0)
    config = replace(TINY_FLUX, guidance_embeds=True)
    model = FluxTransformer(config).eval()
    use_fp8_weights(model)
    inputs = dict(
        hidden_states=torch.randn(batch, 15, config.in_channels),
        encoder_hidden_states=torch.randn(batch, 5, config.joint_attention_dim),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim),
        timestep=torch.tensor([0.7, 0.3][:batch]),
        guidance=torch.tensor([3.5, 2.0][:batch]),
        img_ids=image_position_ids(3, 5),
        txt_ids=text_position_ids(5),
    )
    with torch.no_grad():
        whole = model(**inputs)
        attn = apply_sequence_parallel([model], FLUX, groups)
        (modulation,) = [hook for hook in attn.hooks if isinstance(hook, ShardedModulation)]
        with use_attention_impl(attn):
            sharded = model(**inputs)
        attn.remove()
    return dict(
        sharded=(sharded - whole).abs().max().item(),
        scale=whole.abs().max().item(),
        fp8_pieces=sum(linear.fp8 for linear, _, _ in modulation.pieces),
    )
