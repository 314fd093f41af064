"""A LoRA file's tensor names, in the formats diffusers reads for FLUX.1, Wan, Qwen-Image (and its Edit models)
and HunyuanVideo, turned into one form: the layers of ours each update targets, with its down (A [rank, in]) and
up (B [out, rank]) factors and its alpha (LoraWeights). HunyuanVideo-1.5 adapters are read in diffusers' names
(diffusers has no LoRA loader for its pipelines, only its transformer's load_lora_adapter).

The formats, told apart key by key:
  diffusers / PEFT    `transformer.<module>.lora_A.weight`, `.lora_B.weight` (the prefix may be missing,
                      or PEFT's `base_model.model.`; PEFT's adapter name may sit in the key, `lora_A.default.weight`),
                      an optional `<module>.alpha`; or an alpha for every layer in the adapter metadata diffusers
                      writes (`lora_alpha`, `alpha_pattern`)
  original trainers   `diffusion_model.<original module>` or kohya's `lora_unet_<original_module>`, with
                      `lora_down` / `lora_up` (or `lora_A` / `lora_B`) and `.alpha` (lora/original_names/: FLUX.1,
                      Wan, HunyuanVideo; Qwen-Image's original names are diffusers', so its trainers write
                      `diffusion_model.transformer_blocks.0.attn.to_q` or `lora_unet_transformer_blocks_0_attn_to_q`)

A name may be read several ways (weights.py LoraLayer): after `diffusion_model.` or `lora_unet_` as an original
module first, then as ours (kohya-spelled: matched against the model's names with their dots as underscores,
lora/match.py); after another prefix as ours first, then as an original module (diffusers reads HunyuanVideo's
original names under `transformer.` too). A name of no kind is kept as it is, and matching then says it is no
layer of the model.

Refused, in one line each: text-encoder layers (sgdiff applies LoRA to the transformer only, and an
image made without them would not be the one the adapter's author, or diffusers, makes); DoRA; full or
bias differences (`.diff`, `.diff_b`, `lora_B.bias`); any other tensor."""

from __future__ import annotations

import re

import torch

from sgdiff.errors import UserError
from sgdiff.lora.original_names import Original, original_readings
from sgdiff.lora.weights import LoraLayer, LoraWeights, Reading

ROLES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
         "lora_A.default.weight": "down", "lora_B.default.weight": "up"}  # fmt: skip
ALPHA = "alpha"
FACTOR_NAMES = {"down": "down (lora_A)", "up": "up (lora_B)"}
OURS_PREFIXES = ("transformer.", "base_model.model.")
ORIGINAL_PREFIX, KOHYA_PREFIX = "diffusion_model.", "lora_unet_"
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoders.", "lora_te_", "lora_te1_", "lora_te2_")
DORA_MARKS = ("dora_scale", "lora_magnitude_vector")
DIFFERENCE_SUFFIXES = (".diff", ".diff_b", ".lora_B.bias", ".lora_up.bias")


def lora_weights(name: str, tensors: dict[str, torch.Tensor], metadata: dict) -> LoraWeights:
    """The adapter in file `name` (for messages) from its tensors and adapter metadata."""
    refuse_unsupported(name, tensors, metadata)
    factors: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"down", "up", "alpha"}
    for key, tensor in tensors.items():
        module, role = split_key(name, key)
        factors.setdefault(module, {})[role] = tensor
    default_alpha, alpha_pattern = metadata_alphas(metadata)
    layers = []
    for module, found in factors.items():
        missing = [FACTOR_NAMES[role] for role in FACTOR_NAMES if role not in found]
        if missing:
            raise UserError(f"the LoRA file {name} has no {' and no '.join(missing)} factor for {module}: the file "
                            "is incomplete", field="lora_path")  # fmt: skip
        layers.append(lora_layer(name, module, found, default_alpha, alpha_pattern))
    if not layers:
        raise UserError(f"the LoRA file {name} holds no LoRA layers", field="lora_path")
    return LoraWeights(name, tuple(layers))


def split_key(name: str, key: str) -> tuple[str, str]:
    """(module, role) of a tensor's name: role is down, up or alpha."""
    for suffix, role in ROLES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    if key.endswith("." + ALPHA):
        return key[: -len(ALPHA) - 1], ALPHA
    raise UserError(f"the LoRA file {name} has a tensor {key} that is no LoRA factor (lora_A / lora_B, "
                    "lora_down / lora_up or alpha): not an adapter sgdiff reads", field="lora_path")  # fmt: skip


def refuse_unsupported(name: str, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    keys = list(tensors)
    text = [key for key in keys if key.startswith(TEXT_ENCODER_PREFIXES)]
    if text:
        raise UserError(f"the LoRA file {name} also adapts the text encoder ({len(text)} of its tensors, e.g. "
                        f"{text[0]}); sgdiff applies LoRA to the transformer only: use an adapter trained without "
                        "the text encoder", field="lora_path")  # fmt: skip
    dora = [key for key in keys if any(mark in key for mark in DORA_MARKS)]
    config = peft_config(metadata)
    if dora or config.get("use_dora"):
        example = f" (e.g. {dora[0]})" if dora else ""
        raise UserError(f"the LoRA file {name} is a DoRA adapter{example}, which sgdiff does not apply",
                        field="lora_path")  # fmt: skip
    if config.get("use_rslora"):
        raise UserError(f"the LoRA file {name} is an rsLoRA adapter (alpha / sqrt(rank)), which sgdiff does not "
                        "apply", field="lora_path")  # fmt: skip
    differences = [key for key in keys if key.endswith(DIFFERENCE_SUFFIXES)]
    if differences:
        raise UserError(f"the LoRA file {name} holds full-weight or bias differences (e.g. {differences[0]}), "
                        "which sgdiff does not apply: only low-rank pairs", field="lora_path")  # fmt: skip


def lora_layer(
    name: str, module: str, found: dict[str, torch.Tensor], default_alpha: float | None, pattern: dict[str, float]
) -> LoraLayer:
    down, up = found["down"], found["up"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise UserError(f"the LoRA file {name}: {module} has down {list(down.shape)} and up {list(up.shape)}, "
                        "not a Linear's pair [rank, in] and [out, rank]", field="lora_path")  # fmt: skip
    alpha = float(found[ALPHA].item()) if ALPHA in found else None
    readings = []
    for targets, swapped in module_readings(module):
        reading_up = torch.cat(up.chunk(2)[::-1]) if swapped else up  # (shift, scale) rows -> (scale, shift)
        # (its `.alpha`, else the metadata's for that layer: diffusers' LoraConfig holds for converted names too)
        reading_alpha = alpha if alpha is not None else pattern_alpha(targets[0], pattern, default_alpha)
        readings.append(Reading(targets, reading_up, reading_alpha))
    return LoraLayer(module, down, tuple(readings))


def module_readings(module: str) -> list[Original]:
    """The ways to read the file's `module`, most likely first (see the module's docstring)."""
    kohya = module.startswith(KOHYA_PREFIX)
    if kohya or module.startswith(ORIGINAL_PREFIX):
        name = module.removeprefix(KOHYA_PREFIX if kohya else ORIGINAL_PREFIX)
        readings = [*original_readings(name, underscored=kohya), Original((name,), False)]
    else:
        for prefix in OURS_PREFIXES:
            module = module.removeprefix(prefix)
        readings = [Original((module,), False), *original_readings(module, underscored=False)]
    return list(dict.fromkeys(readings))


def peft_config(metadata: dict) -> dict:
    """The transformer's LoraConfig in diffusers' adapter metadata: its keys `transformer.`-prefixed in a
    pipeline's file, bare in a model's."""
    prefixed = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    return prefixed or metadata


def metadata_alphas(metadata: dict) -> tuple[float | None, dict[str, float]]:
    """(the adapter's lora_alpha, its alpha_pattern: module pattern -> alpha) from the metadata."""
    config = peft_config(metadata)
    alpha = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    return (float(alpha) if alpha is not None else None), {str(k): float(v) for k, v in pattern.items()}


def pattern_alpha(module: str, pattern: dict[str, float], default: float | None) -> float | None:
    """PEFT's choice: the alpha of the first pattern that names `module` (a regular expression matching its
    whole name or a dotted tail of it), else the adapter's."""
    for key, alpha in pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return alpha
    return default
