"""Tiny LoRA adapter files for tests, written as the trainers write them: diffusers/PEFT names, or the original
trainers' (and kohya's) names, with random factors that move a Linear's output by about 30%."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sgdiff.lora.original_names import original_targets
from sgdiff.models.layers import Linear

RANK = 4


def factors(out: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random down [RANK, in] and up [out, RANK] that move a Linear's output by ~30%."""
    return torch.randn(RANK, width, generator=g) / width**0.5, torch.randn(out, RANK, generator=g) * 0.3


def diffusers_file(path, model, modules: list[str], seed: int, alpha: float | None = None):
    """diffusers / PEFT names (`transformer.<module>.lora_A.weight`), with `.alpha` keys when given."""
    g, tensors = torch.Generator().manual_seed(seed), {}
    for name in modules:
        linear = model.get_submodule(name)
        down, up = factors(linear.out_features, linear.in_features, g)
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
        if alpha is not None:
            tensors[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def original_file(path, model, names: dict[str, float | None], seed: int, prefix: str, kohya: bool):
    """The original trainers' names (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`, or kohya's
    `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`), each with its alpha (None: no key)."""
    g, tensors = torch.Generator().manual_seed(seed), {}
    down_key, up_key = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    for name, alpha in names.items():
        targets = original_targets(name, underscored=False)
        assert targets is not None, name
        linears = [model.get_submodule(target) for target in targets]
        down, up = factors(sum(linear.out_features for linear in linears), linears[0].in_features, g)
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
