"""Find a diffusers-format checkpoint and load its parts, safetensors only.

Our own models are built on the meta device and get their weights with
`load_state_dict(assign=True)`: no random init, no second copy in memory; the files are read in
parallel straight onto the device (fast_load.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from sgdiff.errors import UserError
from sgdiff.models.fast_load import read_header, read_safetensors, shared_reader

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

M = TypeVar("M", bound=nn.Module)


def config_fields(cls, raw: dict[str, Any]) -> dict[str, Any]:
    """The keys of a diffusers config.json that dataclass `cls` declares (diffusers adds `_class_name`,
    `_diffusers_version`, ...), with JSON lists turned into tuples. A field `source` (where the config
    came from, for messages) is sgdiff's own: a file's key of that name is not taken."""
    known = {f.name for f in fields(cls)} - {"source"}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}


def read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: is this a diffusers-format checkpoint?") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object")
    return raw


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of one component folder, in shard order.
    Refuses a folder that holds only pickle checkpoints (they are never unpickled)."""
    index_files = sorted(folder.glob("*.safetensors.index.json"))
    if index_files:
        weight_map = read_json(index_files[0]).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UserError(f"{folder}: shard {missing[0]} named in {index_files[0].name} is missing")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise UserError(
            f"{folder} holds only pickle weights (.bin/.pt); sgdiff loads safetensors only: "
            "convert the checkpoint to .safetensors first"
        )
    raise UserError(f"{folder} holds no .safetensors weights")


def load_state_dict(
    folder: Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    keep_fp32: tuple[str, ...] = (),
    wanted: Callable[[str], bool] = lambda name: True,
) -> dict[str, torch.Tensor]:
    """All tensors of a component, read shard by shard straight onto `device` (models/fast_load.py:
    parallel reads, pinned staging on CUDA) and cast there where `dtype` differs. Floating tensors
    whose name has a component in `keep_fp32` (e.g. "norm1" in "blocks.0.norm1.weight") stay float32."""
    state: dict[str, torch.Tensor] = {}
    with shared_reader(torch.device(device)) as reader:
        for path in safetensors_files(folder):
            for name, tensor in read_safetensors(path, reader, wanted).items():
                cast = dtype_after_load(name, tensor.dtype, dtype, keep_fp32)
                state[name] = tensor if tensor.dtype == cast else tensor.to(cast)
    return state


def dtype_after_load(
    name: str, stored: torch.dtype, dtype: torch.dtype | None, keep_fp32: tuple[str, ...]
) -> torch.dtype:
    """The dtype load_state_dict gives tensor `name` stored as `stored`."""
    if not stored.is_floating_point or dtype is None:
        return stored
    return torch.float32 if set(name.split(".")) & set(keep_fp32) else dtype


def with_empty_weights(model: M, dtype: torch.dtype, device: torch.device, keep_fp32: tuple[str, ...] = ()) -> M:
    """A meta-device `model` given uninitialised weights on `device`, each in the dtype load_own_model
    would give it: a model whose numbers do not matter (the kernels' warm-up, speed/warm_up.py)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        cast = dtype_after_load(name, tensor.dtype, dtype, keep_fp32)
        if cast != tensor.dtype:  # on meta: costs nothing
            prefix, _, leaf = name.rpartition(".")
            cast_tensor = tensor.to(cast)
            if isinstance(tensor, nn.Parameter):
                cast_tensor = nn.Parameter(cast_tensor, requires_grad=False)
            setattr(model.get_submodule(prefix), leaf, cast_tensor)  # a buffer stays (non-)persistent
    return model.to_empty(device=device).eval().requires_grad_(False)


def load_own_model(
    model: M,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    keep_fp32: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
    renamed: dict[str, str] | None = None,
) -> M:
    """Give a meta-device `model` the weights in `folder` (strict: every name must match, except
    checkpoint tensors with a name component in `ignored`, which no computation uses). `renamed`:
    checkpoint names the model knows by another name (applied first). The files' headers are checked
    against the model before a byte of weights is read."""
    stored = {(renamed or {}).get(k, k): v for k, v in stored_tensors(folder).items()}
    stored = {k: v for k, v in stored.items() if not set(k.split(".")) & set(ignored)}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - stored.keys()), sorted(stored.keys() - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{folder}: weights do not match {type(model).__name__} ({detail})")
    check_shapes(model, stored)
    used = lambda name: (renamed or {}).get(name, name) in expected  # noqa: E731  (the ignored ones stay unread)
    state = load_state_dict(folder, dtype, device, keep_fp32, used)
    state = {(renamed or {}).get(k, k): v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def stored_tensors(folder: Path) -> dict[str, tuple[Path, list[int]]]:
    """Every tensor of a component's safetensors files as their headers describe it: name -> (file,
    shape). Reads the headers only."""
    return {
        name: (path, shape)
        for path in safetensors_files(folder)
        for name, (_, shape, _, _) in read_header(path)[1].items()
    }


def check_shapes(model: nn.Module, stored: dict[str, tuple[Path, list[int]]]) -> None:
    """Refuse a stored tensor whose shape is not the one `model` (built from its config) has, naming the
    file and the tensor, before anything is read."""
    for name, wanted in model.state_dict().items():
        if name in stored and list(wanted.shape) != stored[name][1]:
            path, shape = stored[name]
            raise UserError(
                f"{path}: tensor {name} has shape {shape}, but {type(model).__name__} built from config.json "
                f"needs {list(wanted.shape)}: the weights and the config.json beside them do not belong together"
            )


def build_on_meta(factory: Callable[..., M], *args: Any) -> M:
    """Construct a module without allocating or initialising its weights."""
    with torch.device("meta"):
        return factory(*args)
