"""The module names of the original trainers' LoRA files, and the layers they stand for in sgdiff's (and
diffusers') transformers: one file of rules per family whose original names differ from diffusers'
(flux.py: FLUX.1; wan.py: Wan; hunyuan_video.py: HunyuanVideo). The facts are those diffusers'
lora_conversion_utils.py converts by. Qwen-Image needs none: its original names are diffusers' (its trainers
write them with `diffusion_model.` before them, or kohya-spelled: lora/keys.py, lora/match.py).

A file names them with `diffusion_model.` before them (or with no prefix, or diffusers' `transformer.`), and
kohya spells them with every dot an underscore after `lora_unet_` (`lora_unet_double_blocks_0_img_attn_qkv`).

Where one original module is several of ours (a joint q/k/v projection; a single-stream block's `linear1`,
which is q, k, v and the MLP's input projection), its update covers their rows in that order. The final
layer's `adaLN_modulation.1` of FLUX.1 and HunyuanVideo makes (shift, scale) where ours makes (scale, shift):
its update's halves are swapped (`swapped_halves`).

The rules of all families are read together: a name two families share stands for the same layers in both
(tests/test_lora_families.py checks every rule's name against the others'), so a file is read without knowing
its model."""

from __future__ import annotations

import re
from typing import NamedTuple

from sgdiff.lora.original_names.flux import FLUX_RULES, FLUX_SWAPPED_HALVES
from sgdiff.lora.original_names.hunyuan_video import HUNYUAN_VIDEO_RULES, HUNYUAN_VIDEO_SWAPPED_HALVES
from sgdiff.lora.original_names.rule import Rule
from sgdiff.lora.original_names.wan import WAN_RULES

RULES: dict[str, list[Rule]] = {"flux": FLUX_RULES, "wan": WAN_RULES, "hunyuan_video": HUNYUAN_VIDEO_RULES}
SWAPPED_HALVES = FLUX_SWAPPED_HALVES | HUNYUAN_VIDEO_SWAPPED_HALVES  # (patterns of RULES)
ALL_RULES = [rule for rules in RULES.values() for rule in rules]
DOTTED = [(re.compile(pattern), pattern, targets) for pattern, targets in ALL_RULES]
# kohya's spelling: every dot an underscore
UNDERSCORED = [(re.compile(pattern.replace(r"\.", "_")), pattern, targets) for pattern, targets in ALL_RULES]


class Original(NamedTuple):
    """What an original module stands for."""

    targets: tuple[str, ...]  # the layers of ours, stacked by rows in this order
    swapped_halves: bool  # its output is (shift, scale) where ours is (scale, shift)


def original_readings(name: str, underscored: bool) -> list[Original]:
    """What the original module `name` (its prefix taken off; kohya-spelled where `underscored`) stands for, in
    each family's rules that name it, each reading once: one, or none (no family names such a module)."""
    found: list[Original] = []
    for compiled, pattern, targets in UNDERSCORED if underscored else DOTTED:
        match = compiled.fullmatch(name)
        if match:
            reading = Original(tuple(t.format(*match.groups()) for t in targets), pattern in SWAPPED_HALVES)
            if reading not in found:
                found.append(reading)
    return found
