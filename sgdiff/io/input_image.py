"""Input images for image-to-video: a local file or an http(s) URL, read into an RGB PIL image.

The engine fetches a request's input files once, in the process that took the request (`fetch`), and
sends their bytes with it: every rank reads the same image, and a URL is downloaded once."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from collections.abc import Mapping
from functools import lru_cache
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


@lru_cache(maxsize=4)  # a request checked, then submitted: one download (a few recent images kept)
def _download_checked(url: str) -> bytes:
    data = download(url)
    read_image_bytes(data, url)
    return data


def fetch(path: str) -> bytes:
    """The bytes of the image at `path` (file or URL), checked to be an image PIL can read."""
    if is_url(path):
        return _download_checked(path)
    data = local_image_file(path).read_bytes()
    read_image_bytes(data, path)
    return data


def load_image(path: str, fetched: Mapping[str, bytes]):
    """The image at `path` as RGB: from the bytes fetched for the request when it has them."""
    return read_image_bytes(fetched[path] if path in fetched else fetch(path), path)


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
