"""Rank functions (sgdiff/testing/distributed.py run_on_ranks) that run the tiny FLUX transformer whole and then
sequence-parallel on the CPU: with FP8 weights (the FP8 math emulated, the parallel code the GPUs' own), and with
unfused LoRA adapters switched after the model was sharded."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from sgdiff.parallel.groups import ParallelGroups


def tiny_flux(batch: int):
    """The tiny FLUX transformer (float32, seeded: every rank builds the same) and its inputs for `batch`."""
    from sgdiff.bench.parts import TINY_FLUX
    from sgdiff.models.flux import FluxTransformer
    from sgdiff.models.flux.packing import image_position_ids, text_position_ids

    torch.manual_seed(0)
    config = replace(TINY_FLUX, guidance_embeds=True)
    model = FluxTransformer(config).eval()
    inputs = dict(
        hidden_states=torch.randn(batch, 15, config.in_channels),
        encoder_hidden_states=torch.randn(batch, 5, config.joint_attention_dim),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim),
        timestep=torch.tensor([0.7, 0.3][:batch]),
        guidance=torch.tensor([3.5, 2.0][:batch]),
        img_ids=image_position_ids(3, 5),
        txt_ids=text_position_ids(5),
    )
    return model, inputs


def sharded_fp8_flux(groups: ParallelGroups, batch: int) -> dict:
    """The tiny FLUX with FP8 weights, whole and sequence-parallel (its modulation shared out over the ranks:
    parallel/modulation.py; under Ulysses-2 the joint attention's own exchange, parallel/sequence.py
    over_streams). Returns the largest difference of the sharded output from the whole one and how many FP8
    modulation Linears this rank computed rows of."""
    from sgdiff.families.flux import FAMILY as FLUX
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.parallel.modulation import ShardedModulation
    from sgdiff.parallel.plans import apply_sequence_parallel
    from sgdiff.speed.fp8 import use_fp8_weights

    model, inputs = tiny_flux(batch)
    use_fp8_weights(model)
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


# each adapter's scales in turn, switched after the model was sharded (the first: the one applied)
LORA_SCALES = ([1.0, 0.0], [0.5, -1.5], [0.0, 0.0])


def sharded_unfused_lora_flux(groups: ParallelGroups, batch: int, fp8: bool = False) -> dict:
    """The tiny FLUX with two unfused LoRA adapters (one on the attention and modulation Linears, one on the
    modulation and MLPs), run whole at each of LORA_SCALES, then sequence-parallel with the scales switched
    as a server switches them; `fp8`: with FP8 weights, made after the adapters as the engine makes them (the
    FP8 math emulated). Returns, per scales: the largest difference of the sharded output from the whole one
    and from the base model's; the output's size; and how many modulation Linears with adapters this rank
    computed rows of, and whether the inputs travelled (parallel/input_exchange.py)."""
    from sgdiff.families.flux import FAMILY as FLUX
    from sgdiff.lora import apply_loras, read_lora
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.parallel.modulation import ShardedModulation
    from sgdiff.parallel.plans import apply_sequence_parallel
    from sgdiff.testing.lora_files import diffusers_file, linear_names

    model, inputs = tiny_flux(batch)
    attention_and_modulation = linear_names(model, "attn") + linear_names(model, "norm")
    modulation_and_mlps = linear_names(model, "norm") + linear_names(model, "ff")
    with tempfile.TemporaryDirectory() as folder:
        files = [
            diffusers_file(Path(folder) / "style.safetensors", model, attention_and_modulation, 8, alpha=8.0),
            diffusers_file(Path(folder) / "detail.safetensors", model, modulation_and_mlps, 9),
        ]
        adapters = [read_lora(str(path)) for path in files]
    handle = apply_loras(model, [(adapters[0], 1.0), (adapters[1], 0.0)], "unfused")
    if fp8:
        from sgdiff.speed.fp8 import use_fp8_weights

        use_fp8_weights(model)
    with torch.no_grad():
        whole = []
        for scales in LORA_SCALES:
            handle.set_scales(scales)
            whole.append(model(**inputs))
        attn = apply_sequence_parallel([model], FLUX, groups)
        (modulation,) = [hook for hook in attn.hooks if isinstance(hook, ShardedModulation)]
        travelled = []  # for each joint attention: whether the inputs travelled (Ulysses-2) instead of q, k and v
        over_streams = attn.over_streams

        def watched(*args):
            travelled.append(over_streams(*args))
            return travelled[-1]

        attn.over_streams = watched
        sharded = []
        with use_attention_impl(attn):
            for scales in LORA_SCALES:
                handle.set_scales(scales)
                sharded.append(model(**inputs))
        attn.remove()
    return dict(
        sharded=[(s - w).abs().max().item() for s, w in zip(sharded, whole, strict=True)],
        moved=[(s - whole[-1]).abs().max().item() for s in sharded],
        scale=max(w.abs().max().item() for w in whole),
        lora_pieces=sum(linear.lora is not None for linear, _, _ in modulation.pieces),
        inputs_travelled=any(handled is not None for handled in travelled),
    )
