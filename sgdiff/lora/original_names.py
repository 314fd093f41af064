"""The module names of the original trainers' LoRA files, and the layers they stand for in sgdiff's (and
diffusers') transformers: FLUX.1 as black-forest-labs' own code names its modules (kohya's sd-scripts
writes them `lora_unet_double_blocks_0_img_attn_qkv`, others `diffusion_model.double_blocks.0.img_attn.qkv`),
Wan as its original repo does (`diffusion_model.blocks.0.self_attn.q`; kohya's musubi-tuner writes
`lora_unet_blocks_0_self_attn_q`). The facts are those diffusers' lora_conversion_utils.py converts by.

Where one original module is several of ours (FLUX's joint q/k/v projections; a single-stream block's
`linear1`, which is q, k, v and the MLP's input projection), its update covers their rows in that order.
FLUX's final `adaLN_modulation.1` makes (shift, scale) where ours makes (scale, shift): its update's
halves are swapped (SWAPPED_HALVES)."""

from __future__ import annotations

import re

# (the original module's name, as a pattern; the layers it stands for, `{0}` its block number)
Rule = tuple[str, tuple[str, ...]]


def attention_rules(original: str, ours: str, names: dict[str, str]) -> list[Rule]:
    return [(rf"{original}\.{theirs}", (f"{ours}.{mine}",)) for theirs, mine in names.items()]


QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
FLUX_RULES: list[Rule] = [
    (r"double_blocks\.(\d+)\.img_attn\.qkv", tuple(f"transformer_blocks.{{0}}.{name}" for name in QKV)),
    (r"double_blocks\.(\d+)\.img_attn\.proj", ("transformer_blocks.{0}.attn.to_out.0",)),
    (r"double_blocks\.(\d+)\.img_mlp\.0", ("transformer_blocks.{0}.ff.net.0.proj",)),
    (r"double_blocks\.(\d+)\.img_mlp\.2", ("transformer_blocks.{0}.ff.net.2",)),
    (r"double_blocks\.(\d+)\.img_mod\.lin", ("transformer_blocks.{0}.norm1.linear",)),
    (
        r"double_blocks\.(\d+)\.txt_attn\.qkv",
        tuple(f"transformer_blocks.{{0}}.attn.{name}" for name in ("add_q_proj", "add_k_proj", "add_v_proj")),
    ),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", ("transformer_blocks.{0}.attn.to_add_out",)),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", ("transformer_blocks.{0}.ff_context.net.0.proj",)),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", ("transformer_blocks.{0}.ff_context.net.2",)),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", ("transformer_blocks.{0}.norm1_context.linear",)),
    (
        r"single_blocks\.(\d+)\.linear1",
        (*(f"single_transformer_blocks.{{0}}.{name}" for name in QKV), "single_transformer_blocks.{0}.proj_mlp"),
    ),
    (r"single_blocks\.(\d+)\.linear2", ("single_transformer_blocks.{0}.proj_out",)),
    (r"single_blocks\.(\d+)\.modulation\.lin", ("single_transformer_blocks.{0}.norm.linear",)),
    (r"img_in", ("x_embedder",)),
    (r"txt_in", ("context_embedder",)),
    (r"time_in\.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    (r"time_in\.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    (r"vector_in\.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    (r"vector_in\.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    (r"guidance_in\.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    (r"guidance_in\.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    (r"final_layer\.linear", ("proj_out",)),
    (r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",)),
]
SWAPPED_HALVES = frozenset({"norm_out.linear"})

WAN_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
WAN_RULES: list[Rule] = [
    *attention_rules(r"blocks\.(\d+)\.self_attn", "blocks.{0}.attn1", WAN_ATTENTION),
    *attention_rules(
        r"blocks\.(\d+)\.cross_attn",
        "blocks.{0}.attn2",
        {**WAN_ATTENTION, "k_img": "add_k_proj", "v_img": "add_v_proj"},
    ),
    (r"blocks\.(\d+)\.ffn\.0", ("blocks.{0}.ffn.net.0.proj",)),
    (r"blocks\.(\d+)\.ffn\.2", ("blocks.{0}.ffn.net.2",)),
    (r"time_projection\.1", ("condition_embedder.time_proj",)),
    (r"head\.head", ("proj_out",)),
    (r"text_embedding\.0", ("condition_embedder.text_embedder.linear_1",)),
    (r"text_embedding\.2", ("condition_embedder.text_embedder.linear_2",)),
    (r"time_embedding\.0", ("condition_embedder.time_embedder.linear_1",)),
    (r"time_embedding\.2", ("condition_embedder.time_embedder.linear_2",)),
    (r"img_emb\.proj\.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    (r"img_emb\.proj\.3", ("condition_embedder.image_embedder.ff.net.2",)),
]

RULES = FLUX_RULES + WAN_RULES  # no original name matches a rule of both
DOTTED = [(re.compile(pattern), targets) for pattern, targets in RULES]
# kohya's spelling: every dot an underscore
UNDERSCORED = [(re.compile(pattern.replace(r"\.", "_")), targets) for pattern, targets in RULES]


def original_targets(name: str, underscored: bool) -> tuple[str, ...] | None:
    """The layers of ours that the original module `name` (its prefix, `diffusion_model.` or
    `lora_unet_`, taken off) stands for; None: no original module of that name is known."""
    for pattern, targets in UNDERSCORED if underscored else DOTTED:
        match = pattern.fullmatch(name)
        if match:
            return tuple(target.format(*match.groups()) for target in targets)
    return None
