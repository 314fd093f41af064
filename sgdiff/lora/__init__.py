"""LoRA adapters for the transformers (FLUX.1, Wan, Qwen-Image and its Edit models, HunyuanVideo,
HunyuanVideo-1.5; any model built of models/layers.py Linears whose names are diffusers'): read from safetensors in
the formats diffusers reads (lora/keys.py, lora/original_names/), matched against the model's Linears
(lora/match.py), then fused into the weights or kept beside them (lora/apply.py)."""

from sgdiff.lora.apply import LORA_MODES, AppliedLoras, apply_loras, lora_mode, read_lora
from sgdiff.lora.files import parse_lora_spec
from sgdiff.lora.weights import LoraLayer, LoraWeights

__all__ = [
    "LORA_MODES",
    "AppliedLoras",
    "LoraLayer",
    "LoraWeights",
    "apply_loras",
    "lora_mode",
    "parse_lora_spec",
    "read_lora",
]
