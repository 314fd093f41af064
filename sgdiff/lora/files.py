"""Where a LoRA adapter comes from: `PATH_OR_REPO[:SCALE]` names a .safetensors file, a folder holding
one, or a Hub repo holding one (fetched, or found in the HF cache, as models/resolve.py fetches a model).
Only safetensors are read: a pickle (.bin, .pt, .ckpt: torch.save) is refused, never unpickled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sgdiff.errors import UserError
from sgdiff.models.loading import PICKLE_SUFFIXES
from sgdiff.models.resolve import hub_unreachable, looks_like_repo_id

DIFFUSERS_FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"  # diffusers/PEFT keep the adapter's LoraConfig as JSON under it
# how a pickle starts: torch.save's zip archive, or a bare pickle (protocol 2 or later)
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`PATH_OR_REPO[:SCALE]` -> (path or repo id, scale; 1.0 when none is given). A last `:` part that
    is no number belongs to the path, and so does one of a path that exists as written."""
    source, scale = spec, 1.0
    head, colon, tail = spec.rpartition(":")
    if colon and not Path(spec).expanduser().exists():
        try:
            source, scale = head, float(tail)
        except ValueError:
            pass
    if not source:
        raise UserError(f"`lora_path` {spec!r} names no file: give a .safetensors file, a folder or a Hub repo id "
                        "(then :SCALE if you like)", field="lora_path")  # fmt: skip
    if not math.isfinite(scale):
        raise UserError(f"`lora_path` {spec}: the scale {tail} is not a finite number", field="lora_path")
    return source, scale


def lora_file(source: str) -> Path:
    """The .safetensors file `source` names: a file, a folder with one (or with diffusers' own file
    name), or a Hub repo id whose files are fetched (or found in the HF cache)."""
    local = Path(source).expanduser()
    if local.is_file():
        path = local
    elif local.is_dir():
        path = file_in_folder(local, source)
    elif looks_like_repo_id(source) and not source.endswith((".safetensors", *PICKLE_SUFFIXES)):
        path = file_in_folder(download(source), source)
    else:
        raise UserError(
            f"`lora_path` {source} does not exist (and is not a Hub repo id like owner/name)", field="lora_path"
        )
    refuse_pickle(path)
    return path


def file_in_folder(folder: Path, source: str) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if (folder / DIFFUSERS_FILE_NAME) in files:
        return folder / DIFFUSERS_FILE_NAME
    if files:
        names = ", ".join(path.name for path in files[:4])
        raise UserError(f"`lora_path` {source} holds several .safetensors files ({names}): name one of them",
                        field="lora_path")  # fmt: skip
    if any(path.suffix in PICKLE_SUFFIXES for path in folder.iterdir()):
        raise UserError(f"`lora_path` {source} holds only pickle weights (.bin/.pt); sgdiff loads LoRA adapters "
                        "from .safetensors only: convert it first", field="lora_path")  # fmt: skip
    raise UserError(f"`lora_path` {source} holds no .safetensors file", field="lora_path")


def refuse_pickle(path: Path) -> None:
    with open(path, "rb") as handle:
        start = handle.read(9)
    # (a safetensors file starts with its header's length, 8 bytes little-endian, then the header's "{": a length
    # of 128 + 256k starts with the byte a bare pickle starts with)
    safetensors = start[8:9] == b"{"
    if path.suffix in PICKLE_SUFFIXES or (start.startswith(PICKLE_MAGIC) and not safetensors):
        raise UserError(f"`lora_path` {path} is a pickle file; sgdiff loads LoRA adapters from .safetensors only "
                        "(never unpickles): convert it first", field="lora_path")  # fmt: skip


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the file, on the CPU as stored, and the adapter metadata diffusers/PEFT wrote
    beside them (their LoraConfig: `lora_alpha`, `alpha_pattern`, ...; {} when there is none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118  (no iterator)
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"`lora_path` {path} is not a readable safetensors file ({reason})", field="lora_path"
        ) from None
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise UserError(f"`lora_path` {path}: its {METADATA_KEY} is not valid JSON", field="lora_path") from None
    return tensors, metadata if isinstance(metadata, dict) else {}


def download(repo_id: str) -> Path:
    """The repo's .safetensors files, fetched or found in the HF cache (where the Hub cannot be reached,
    the cache alone answers, at once); honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = constants.HF_HUB_OFFLINE or hub_unreachable(constants.ENDPOINT)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors"], local_files_only=offline))
    except GatedRepoError:
        raise UserError(f"`lora_path` {repo_id} is gated: accept its licence on the Hub and set HF_TOKEN",
                        field="lora_path") from None  # fmt: skip
    except RepositoryNotFoundError:
        raise UserError(f"`lora_path` {repo_id}: no such local file or folder, and no Hub repo of that name "
                        "(private? set HF_TOKEN)", field="lora_path") from None  # fmt: skip
    except LocalEntryNotFoundError:
        raise UserError(f"`lora_path` {repo_id} is not in the local HF cache and the Hub cannot be reached "
                        "(offline?): download it first or give a local file", field="lora_path") from None  # fmt: skip
