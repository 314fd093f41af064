"""PNG output: written atomically, with the generation parameters in a text chunk."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "sgdiff"


def write_atomically(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: np.ndarray, path: Path, parameters: dict[str, Any]) -> Path:
    """image: [H, W, 3] uint8. The parameters are stored as JSON under the `sgdiff` text key."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    write_atomically(path, lambda handle: Image.fromarray(image).save(handle, format="PNG", pnginfo=info))
    return path


def read_png_parameters(path: Path) -> dict[str, Any]:
    with Image.open(path) as image:
        return json.loads(image.text[PARAMETERS_KEY])


def slugify(text: str, max_length: int = 48) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return slug[:max_length].rstrip("-") or "image"


OTHER_FORMATS = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mp4")


def png_stem(file_name: str) -> str:
    """NAME or NAME.png -> NAME."""
    return file_name[: -len(".png")] if file_name.lower().endswith(".png") else file_name


def check_output_file_name(file_name: str) -> str | None:
    """A message saying what is wrong with --output-file-name, or None."""
    if not file_name or file_name in (".", "..") or "/" in file_name or os.sep in file_name:
        return "--output-file-name takes a plain file name; put folders in --output-path"
    if file_name.lower().endswith(OTHER_FORMATS):
        return "--output-file-name: sgdiff writes PNG images; give NAME or NAME.png"
    return None


class OutputNamer:
    """File names for a run's images.

    With --output-file-name NAME: NAME.png for a single image, else NAME_0.png, NAME_1.png, ...
    in generation order. Without it: <prompt-slug>_<seed>.png, with _<k> per extra output.
    """

    def __init__(self, output_dir: Path, file_name: str | None, total_outputs: int):
        self.output_dir = output_dir
        self.file_name = file_name
        self.total_outputs = total_outputs
        self.count = 0

    def next_path(self, prompt: str, seed: int, index_in_prompt: int, outputs_per_prompt: int) -> Path:
        if self.file_name:
            stem, suffix = png_stem(self.file_name), ".png"
            if self.total_outputs > 1:
                stem = f"{stem}_{self.count}"
        else:
            stem, suffix = f"{slugify(prompt)}_{seed}", ".png"
            if outputs_per_prompt > 1:
                stem = f"{stem}_{index_in_prompt}"
        self.count += 1
        return self.output_dir / f"{stem}{suffix}"
