"""Writing output files safely: atomically, with normal permissions, to places tried up front. A write
that fails leaves nothing behind (no partial file, no folder made for it) and raises WriteFailed,
which says why in plain words."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from sgdiff.errors import WriteFailed

MAX_FILE_NAME_BYTES = 200  # below the usual 255-byte limit, leaving room for numbered suffixes
NO_SPACE = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}


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
    when complete, with the usual permissions. An OSError on the way becomes WriteFailed."""
    made: list[Path] = []
    try:
        made = make_folders(path.parent)
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
    except BaseException as error:
        remove_empty_folders(made)
        if isinstance(error, OSError):
            raise write_failed(path, error) from root_cause(error)
        raise


def write_folder_atomically(folder: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp_folder)` fills a temp folder beside `folder`, which then replaces `folder` whole. An
    OSError on the way becomes WriteFailed."""
    made: list[Path] = []
    try:
        made = make_folders(folder.parent)
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
    except BaseException as error:
        remove_empty_folders(made)
        if isinstance(error, OSError):
            raise write_failed(folder, error) from root_cause(error)
        raise


def make_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; returns those made, outermost first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    made: list[Path] = []
    try:
        for candidate in reversed(missing):
            try:
                candidate.mkdir()
            except FileExistsError:
                if not candidate.is_dir():  # a file, a broken link or a loop (another process's folder is fine)
                    raise
                continue
            made.append(candidate)
    except BaseException:
        remove_empty_folders(made)
        raise
    return made


def remove_empty_folders(made: list[Path]) -> None:
    """Undo make_folders, innermost first, as far as the folders are still empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def mount_point(path: Path) -> str:
    """Where the file system that holds `path` (or would hold it) is mounted: what names a full disk."""
    place = os.path.realpath(path)
    while not os.path.ismount(place):
        place = os.path.dirname(place)
    return place


def root_cause(error: OSError) -> BaseException:
    """The OSError under a WriteFailed (a frame's file inside a folder of frames), else `error`."""
    return error.__cause__ if isinstance(error, WriteFailed) and error.__cause__ is not None else error


def write_failed(path: Path, error: OSError) -> WriteFailed:
    """`error`, met while writing `path`, as one plain line naming `path` (not the temp file)."""
    cause = root_cause(error)
    number = getattr(cause, "errno", None)
    if number in NO_SPACE:
        message = f"{NO_SPACE[number]} on {mount_point(path)} writing {path}"
    elif number == errno.EROFS:
        message = f"{mount_point(path)} is read-only: cannot write {path}"
    else:
        message = f"cannot write {path} ({getattr(cause, 'strerror', None) or cause})"
    failed = WriteFailed(message)
    failed.errno = number
    return failed


def control_character(text: str) -> str | None:
    """The first line break or control character in `text`, or None. Written paths go to stdout one
    per line, so a name holding one would read as two paths (or move the terminal's cursor)."""
    return next((char for char in text if unicodedata.category(char) in ("Cc", "Zl", "Zp")), None)


def output_location_problem(path: Path, flag: str, want_folder: bool) -> str | None:
    """Why `path` cannot be written (as a folder or as a file), or None. Checked before any work: the
    folder is tried (made if missing, a temp file made and removed there, what was made removed)."""
    if (char := control_character(str(path))) is not None:
        return f"{flag} must not hold line breaks or control characters (found {char!r})"
    if not want_folder and len(os.fsencode(path.name)) > MAX_FILE_NAME_BYTES:
        return f"{flag}: the file name is too long (at most {MAX_FILE_NAME_BYTES} bytes)"
    try:
        if want_folder and path.exists() and not path.is_dir():
            return f"{flag} {path} is a file; give a folder"
        if not want_folder and path.is_dir():
            return f"{flag} {path} is a folder; give a file path"
        folder = path if want_folder else path.parent
        parent = folder
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{flag} {path}: {parent} is a file, not a folder"
        problem = folder_problem(folder)
    except OSError as error:
        problem = refusal(Path(error.filename or path), error, making=True)
    if problem is None:
        return None
    if problem.startswith(f"{path} "):  # about `path` itself: "--output-path X is ..."
        return f"{flag} {problem}"
    return f"{flag} {path}: {problem}"


def folder_problem(folder: Path) -> str | None:
    """What stops files being written in `folder`, found by making it (and its parents) if missing,
    making and removing a temp file there, and removing the folders made; None if nothing does."""
    try:
        made = make_folders(folder)
    except OSError as error:
        return refusal(Path(error.filename or folder), error, making=True)
    try:
        fd, name = tempfile.mkstemp(prefix=".sgdiff-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        return refusal(folder, error, making=False)
    finally:
        remove_empty_folders(made)
    return None


def refusal(target: Path, error: OSError, making: bool) -> str:
    """Why making the folder `target` (making) or a file in the folder `target` failed, in plain words."""
    number = error.errno
    if number == errno.ENAMETOOLONG:
        return "the path or a name in it is too long"
    if number == errno.EEXIST and target.is_symlink():
        try:
            os.stat(target)
        except OSError as link_error:
            if link_error.errno == errno.ELOOP:
                return f"{target} is a symbolic link loop"
        return f"{target} is a broken symbolic link (to {os.readlink(target)})"
    if number == errno.EEXIST:
        return f"{target} exists and is not a folder"
    if number == errno.ELOOP:
        return f"{target} goes through a symbolic link loop"
    if number in (errno.EACCES, errno.EPERM):
        return f"{target.parent if making else target} is not writable"
    if number == errno.EROFS:
        return f"{mount_point(target)} is read-only"
    if number in NO_SPACE:
        return f"{NO_SPACE[number]} on {mount_point(target)}"
    what = f"cannot create the folder {target}" if making else f"cannot create files in {target}"
    return what if number == errno.ENOENT or not error.strerror else f"{what} ({error.strerror.lower()})"
