"""HunyuanVideo's modules as Tencent's repo names them (`diffusion_model.double_blocks.0.img_attn_qkv`, as
diffusion-pipe writes them; kohya's musubi-tuner writes `lora_unet_double_blocks_0_img_attn_qkv`), and the layers
of ours they stand for, as diffusers' lora_conversion_utils.py (_convert_hunyuan_video_lora_to_diffusers)
converts them.

Where a name is FLUX.1's too (`single_blocks.N.linear1`, `vector_in.in_layer`, the final layer's), it stands for
the same layers: the two share the layout and diffusers' names. The text refiner (`txt_in`, diffusers'
`context_embedder`) is HunyuanVideo's own; its blocks' `adaLN_modulation.1` (gates only) keeps its order, the final
layer's (shift, scale) is swapped as FLUX.1's. The patch embedder `img_in.proj` is a convolution: no rule.

HunyuanVideo-1.5's original names are not here: diffusers reads no LoRA file for its pipelines (no loader), and
adapters of it in diffusers' names need no rule."""

from __future__ import annotations

from sgdiff.lora.original_names.rule import ADDED_QKV, FINAL_MODULATION, QKV, Rule, stacked

DOUBLE = "transformer_blocks.{0}"
SINGLE = "single_transformer_blocks.{0}"
REFINER = "context_embedder.token_refiner.refiner_blocks.{0}"
REFINER_BLOCKS = r"txt_in\.individual_token_refiner\.blocks\.(\d+)"

HUNYUAN_VIDEO_RULES: list[Rule] = [
    (r"double_blocks\.(\d+)\.img_attn_qkv", stacked(DOUBLE, QKV)),
    (r"double_blocks\.(\d+)\.img_attn_proj", (f"{DOUBLE}.attn.to_out.0",)),
    (r"double_blocks\.(\d+)\.img_mlp\.fc1", (f"{DOUBLE}.ff.net.0.proj",)),
    (r"double_blocks\.(\d+)\.img_mlp\.fc2", (f"{DOUBLE}.ff.net.2",)),
    (r"double_blocks\.(\d+)\.img_mod\.linear", (f"{DOUBLE}.norm1.linear",)),
    (r"double_blocks\.(\d+)\.txt_attn_qkv", stacked(DOUBLE, ADDED_QKV)),
    (r"double_blocks\.(\d+)\.txt_attn_proj", (f"{DOUBLE}.attn.to_add_out",)),
    (r"double_blocks\.(\d+)\.txt_mlp\.fc1", (f"{DOUBLE}.ff_context.net.0.proj",)),
    (r"double_blocks\.(\d+)\.txt_mlp\.fc2", (f"{DOUBLE}.ff_context.net.2",)),
    (r"double_blocks\.(\d+)\.txt_mod\.linear", (f"{DOUBLE}.norm1_context.linear",)),
    # linear1: q, k, v and the MLP's input projection in one (diffusers splits it at HunyuanVideo's 3072 only)
    (r"single_blocks\.(\d+)\.linear1", stacked(SINGLE, (*QKV, "proj_mlp"))),
    (r"single_blocks\.(\d+)\.linear2", (f"{SINGLE}.proj_out",)),
    (r"single_blocks\.(\d+)\.modulation\.linear", (f"{SINGLE}.norm.linear",)),
    (r"time_in\.mlp\.0", ("time_text_embed.timestep_embedder.linear_1",)),
    (r"time_in\.mlp\.2", ("time_text_embed.timestep_embedder.linear_2",)),
    (r"guidance_in\.mlp\.0", ("time_text_embed.guidance_embedder.linear_1",)),
    (r"guidance_in\.mlp\.2", ("time_text_embed.guidance_embedder.linear_2",)),
    (r"vector_in\.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    (r"vector_in\.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    (r"final_layer\.linear", ("proj_out",)),
    (FINAL_MODULATION, ("norm_out.linear",)),
    # the text refiner
    (r"txt_in\.input_embedder", ("context_embedder.proj_in",)),
    (r"txt_in\.t_embedder\.mlp\.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
    (r"txt_in\.t_embedder\.mlp\.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
    (r"txt_in\.c_embedder\.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
    (r"txt_in\.c_embedder\.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
    (rf"{REFINER_BLOCKS}\.self_attn_qkv", stacked(REFINER, QKV)),
    (rf"{REFINER_BLOCKS}\.self_attn_proj", (f"{REFINER}.attn.to_out.0",)),
    (rf"{REFINER_BLOCKS}\.mlp\.fc1", (f"{REFINER}.ff.net.0.proj",)),
    (rf"{REFINER_BLOCKS}\.mlp\.fc2", (f"{REFINER}.ff.net.2",)),
    (rf"{REFINER_BLOCKS}\.adaLN_modulation\.1", (f"{REFINER}.norm_out.linear",)),
]
HUNYUAN_VIDEO_SWAPPED_HALVES = frozenset({FINAL_MODULATION})
