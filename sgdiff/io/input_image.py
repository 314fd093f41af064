"""Input images for image-to-video: a local file or an http(s) URL, read into an RGB PIL image."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path

from sgdiff.errors import UserError

DOWNLOAD_TIMEOUT_S = 30
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def local_image_file(path: str) -> Path:
    """The file behind a local --image-path, or a one-line error."""
    local = Path(path).expanduser()
    if local.is_dir():
        raise UserError(f"`image_path` {path} is a folder; give an image file or an http(s) URL", field="image_path")
    if not local.is_file():
        raise UserError(f"`image_path` {path} does not exist", field="image_path")
    return local


def check_image_path(path: str) -> None:
    """Checks that need no network: a local file must exist and be an image."""
    if not is_url(path):
        read_image_bytes(local_image_file(path).read_bytes(), path)


def read_image_bytes(data: bytes, source: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise UserError(
            f"`image_path` {source} is not an image PIL can read (PNG, JPEG, WebP, ...)", field="image_path"
        ) from None
    return image.convert("RGB")


_downloaded: dict[str, bytes] = {}


def prefetch(path: str) -> None:
    """Download a URL now (once), so a bad URL fails before any weights load; load_image reuses it."""
    if is_url(path) and path not in _downloaded:
        _downloaded[path] = download(path)
        read_image_bytes(_downloaded[path], path)


def load_image(path: str):
    """The image at `path` (file or URL) as RGB."""
    if not is_url(path):
        return read_image_bytes(local_image_file(path).read_bytes(), path)
    data = _downloaded[path] if path in _downloaded else download(path)
    return read_image_bytes(data, path)


def download(path: str) -> bytes:
    try:
        with urllib.request.urlopen(path, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, TimeoutError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"`image_path` {path} could not be downloaded ({reason})", field="image_path") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise UserError(f"`image_path` {path} is larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB", field="image_path")
    return data
