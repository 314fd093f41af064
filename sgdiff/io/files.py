"""Writing output files safely: atomically, with normal permissions, to places checked up front."""

from __future__ import annotations

import os
import shutil
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

    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    write_path_atomically(path, write_file)


def write_path_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` creates the file `tmp` (same folder, same suffix); it is renamed to `path` only
    when complete, with the usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".sgdiff-", suffix=".part" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_folder_atomically(folder: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp_folder)` fills a temp folder beside `folder`, which then replaces `folder` whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sgdiff-", suffix=".part", dir=folder.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if not folder.exists():
            os.replace(tmp, folder)
            return
        old = Path(tempfile.mkdtemp(prefix=".sgdiff-old-", dir=folder.parent))
        try:
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
        except BaseException:
            if not folder.exists() and (old / folder.name).exists():
                os.replace(old / folder.name, folder)  # put the previous output back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
