"""Tiny LoRA adapter files for tests, written as the trainers write them: diffusers/PEFT names, or the original
trainers' (and kohya's) names, with random factors that move a Linear's output by about 30%."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors.torch import save_file

from sgdiff.lora.files import METADATA_KEY
from sgdiff.lora.original_names import original_readings
from sgdiff.models.layers import Linear

RANK = 4


def factors(out: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random down [RANK, in] and up [out, RANK] that move a Linear's output by ~30%."""
    return torch.randn(RANK, width, generator=g) / width**0.5, torch.randn(out, RANK, generator=g) * 0.3


def diffusers_file(
    path, model, modules: list[str], seed: int, alpha: float | None = None, metadata_alpha: float | None = None
):
    """diffusers / PEFT names (`transformer.<module>.lora_A.weight`), with `.alpha` keys when given, or with the
    LoraConfig that diffusers' save_lora_weights writes beside the tensors (its `lora_alpha`): diffusers reads
    `.alpha` keys of diffusers names for FLUX.1 and Wan only, the metadata for every family."""
    g, tensors = torch.Generator().manual_seed(seed), {}
    for name in modules:
        linear = model.get_submodule(name)
        down, up = factors(linear.out_features, linear.in_features, g)
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
        if alpha is not None:
            tensors[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata=peft_metadata(metadata_alpha, modules) if metadata_alpha is not None else None)
    return path


def peft_metadata(alpha: float, modules: list[str]) -> dict[str, str]:
    """The safetensors metadata diffusers' save_lora_weights writes: the transformer's LoraConfig (rank RANK)."""
    config = {"r": RANK, "lora_alpha": alpha, "target_modules": modules}
    return {METADATA_KEY: json.dumps({f"transformer.{key}": value for key, value in config.items()})}


def original_file(
    path,
    model,
    names: dict[str, float | None],
    seed: int,
    prefix: str,
    kohya: bool,
    alike_halves: Collection[str] = (),
):
    """The original trainers' names (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`, or kohya's
    `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`), each with its alpha (None: no key). A name that
    no rule of the model's family knows is a layer of ours (Qwen-Image's trainers write diffusers' names so).
    `alike_halves`: names whose down factor's two halves of rows are equal (diffusers' HunyuanVideo conversion
    swaps the halves of the final modulation's down factor as well as of its up one, which is right only then)."""
    g, tensors = torch.Generator().manual_seed(seed), {}
    down_key, up_key = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    modules = dict(model.named_modules())
    for name, alpha in names.items():
        readings = [reading.targets for reading in original_readings(name, underscored=False)] + [(name,)]
        targets = next(targets for targets in readings if all(target in modules for target in targets))
        linears = [modules[target] for target in targets]
        down, up = factors(sum(linear.out_features for linear in linears), linears[0].in_features, g)
        if name in alike_halves:
            down = down[: RANK // 2].repeat(2, 1)  # [RANK / 2, in] twice
        key = prefix + (name.replace(".", "_") if kohya else name)
        tensors[f"{key}.{down_key}.weight"], tensors[f"{key}.{up_key}.weight"] = down, up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def linear_names(model, inside: str = "") -> list[str]:
    """The names of the model's Linears (sgdiff's, or diffusers' / torch's) whose name holds `inside`."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (Linear, torch.nn.Linear)) and inside in name
    ]


def flux_style_and_detail(transformer_folder: Path, folder: Path) -> dict[str, Path]:
    """Two adapters for a FLUX.1 transformer, in diffusers' names: `style` (the attention Linears, rank 8,
    alpha 8) and `detail` (the MLPs)."""
    from diffusers import FluxTransformer2DModel

    from sgdiff.pipeline.components import quiet_libraries

    with quiet_libraries():
        model = FluxTransformer2DModel.from_pretrained(transformer_folder)
    return {
        "style": diffusers_file(folder / "style.safetensors", model, linear_names(model, "attn"), 8, alpha=8.0),
        "detail": diffusers_file(folder / "detail.safetensors", model, linear_names(model, "ff"), 9),
    }
