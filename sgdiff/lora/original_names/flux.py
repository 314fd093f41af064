"""FLUX.1's modules as black-forest-labs' own code names them (kohya's sd-scripts writes them
`lora_unet_double_blocks_0_img_attn_qkv`, others `diffusion_model.double_blocks.0.img_attn.qkv`), and the layers
of ours they stand for, as diffusers' lora_conversion_utils.py converts them."""

from __future__ import annotations

from sgdiff.lora.original_names.rule import ADDED_QKV, FINAL_MODULATION, QKV, Rule, stacked

DOUBLE = "transformer_blocks.{0}"
SINGLE = "single_transformer_blocks.{0}"

FLUX_RULES: list[Rule] = [
    (r"double_blocks\.(\d+)\.img_attn\.qkv", stacked(DOUBLE, QKV)),
    (r"double_blocks\.(\d+)\.img_attn\.proj", (f"{DOUBLE}.attn.to_out.0",)),
    (r"double_blocks\.(\d+)\.img_mlp\.0", (f"{DOUBLE}.ff.net.0.proj",)),
    (r"double_blocks\.(\d+)\.img_mlp\.2", (f"{DOUBLE}.ff.net.2",)),
    (r"double_blocks\.(\d+)\.img_mod\.lin", (f"{DOUBLE}.norm1.linear",)),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv", stacked(DOUBLE, ADDED_QKV)),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", (f"{DOUBLE}.attn.to_add_out",)),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", (f"{DOUBLE}.ff_context.net.0.proj",)),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", (f"{DOUBLE}.ff_context.net.2",)),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", (f"{DOUBLE}.norm1_context.linear",)),
    # linear1: q, k, v and the MLP's input projection in one
    (r"single_blocks\.(\d+)\.linear1", stacked(SINGLE, (*QKV, "proj_mlp"))),
    (r"single_blocks\.(\d+)\.linear2", (f"{SINGLE}.proj_out",)),
    (r"single_blocks\.(\d+)\.modulation\.lin", (f"{SINGLE}.norm.linear",)),
    (r"img_in", ("x_embedder",)),
    (r"txt_in", ("context_embedder",)),
    (r"time_in\.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    (r"time_in\.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    (r"vector_in\.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    (r"vector_in\.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    (r"guidance_in\.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    (r"guidance_in\.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    (r"final_layer\.linear", ("proj_out",)),
    (FINAL_MODULATION, ("norm_out.linear",)),
]
FLUX_SWAPPED_HALVES = frozenset({FINAL_MODULATION})
