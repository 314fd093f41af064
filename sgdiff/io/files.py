"""Writing output files safely: atomically, with normal permissions, to places checked up front."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

MAX_FILE_NAME_BYTES = 200  # below the usual 255-byte limit, leaving room for numbered suffixes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sgdiff-", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_location_problem(path: Path, flag: str, want_folder: bool) -> str | None:
    """Why `path` cannot be written (as a folder or as a file), or None. Checked before any work."""
    if want_folder and path.exists() and not path.is_dir():
        return f"{flag} {path} is a file; give a folder"
    if not want_folder and path.is_dir():
        return f"{flag} {path} is a folder; give a file path"
    if not want_folder and len(os.fsencode(path.name)) > MAX_FILE_NAME_BYTES:
        return f"{flag}: the file name is too long (at most {MAX_FILE_NAME_BYTES} bytes)"
    parent = path if want_folder else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"{flag} {path}: {parent} is not writable"
    return None
