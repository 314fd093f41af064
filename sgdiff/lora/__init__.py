"""LoRA adapters for the transformers (FLUX.1, Wan, Qwen-Image and its Edit models, HunyuanVideo,
HunyuanVideo-1.5; any model built of models/layers.py Linears whose names are diffusers'): read from safetensors in
the formats diffusers reads (lora/keys.py, lora/original_names/), matched against the model's Linears
(lora/match.py), then fused into the weights or kept beside them (lora/apply.py)."""

from sgdiff.config import LORA_MODES
from sgdiff.lora.apply import AppliedLoras, apply_loras, read_lora
from sgdiff.lora.files import parse_lora_spec
from sgdiff.lora.weights import LoraLayer, LoraWeights

__all__ = [
    "LORA_MODES",
    "AppliedLoras",
    "LoraLayer",
    "LoraWeights",
    "apply_loras",
    "parse_lora_spec",
    "read_lora",
]
