"""Wan's modules as its original repo names them (`diffusion_model.blocks.0.self_attn.q`; kohya's musubi-tuner
writes `lora_unet_blocks_0_self_attn_q`), and the layers of ours they stand for, as diffusers'
lora_conversion_utils.py converts them."""

from __future__ import annotations

from sgdiff.lora.original_names.rule import Rule, attention_rules

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
