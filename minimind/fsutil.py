"""Durable file writes: fsync of files and folders, write-to-temp-then-rename, and the
filesystem faults of writers told in one line.

Shared by checkpoint.py (whole folders), data/shards.py (shard files) and convert/ (.pth
files), so that every writer in the project leaves either the old file or the new one, never
half of one, whatever kills it.

Faults: `check_writable` finds an unwritable output folder before any work is done;
`explained_writes` turns a failed write (a full disk, a read-only or permission-denied
folder, a quota, a file size limit) into an `OutputError` whose message is one line naming
the path and the cause. The writers below Python do not all raise OSError: safetensors
raises its own error with "(os error N)" in the text, and torch.save's zip writer says only
"unexpected pos" or "file write failed"; both are recognised here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large (a file size limit)",
    errno.ENOTDIR: "a file stands where a folder should be",
    errno.EEXIST: "a file stands where a folder should be",
}
_OS_ERROR = re.compile(r"os error (\d+)")
# torch.save's zip writer reports a short write without its errno.
_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


class OutputError(RuntimeError):
    """An output could not be written; the message is one line: the path and the cause."""


def write_cause(err: BaseException) -> str | None:
    """The filesystem cause of a failed write, in words, or None when `err` is no such fault.

    >>> write_cause(OSError(errno.ENOSPC, "No space left on device"))
    'no space left on the device'
    >>> write_cause(RuntimeError("Error while serializing: I/O error: Read-only (os error 30)"))
    'read-only file system'
    >>> write_cause(ValueError("bad shape")) is None
    True
    """
    if isinstance(err, OSError) and err.errno in CAUSES:
        return CAUSES[err.errno]
    text = str(err)
    m = _OS_ERROR.search(text)
    if m and int(m.group(1)) in CAUSES:
        return CAUSES[int(m.group(1))]
    if any(s in text for s in _SHORT_WRITE):
        return "the write stopped short (a full disk, a quota or a file size limit)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return None


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or its
    nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create `folder` (with its parents) and a probe file in it, or raise OutputError
    naming `what`, the folder and the cause. Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{what} {folder} is not writable: {write_cause(err)}") from None
    return folder


@contextlib.contextmanager
def explained_writes(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Writes in the block that fail on a filesystem fault raise OutputError("cannot write
    {what} {path}: {cause}"), chained to the original error; other errors pass unchanged."""
    try:
        yield
    except OutputError:
        raise
    except Exception as err:  # safetensors' own error is neither OSError nor RuntimeError
        cause = write_cause(err)
        if cause is None:
            raise
        free = free_bytes(path) / 1e6
        raise OutputError(f"cannot write {what} {path}: {cause} ({free:.1f} MB free)") from err


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and new entries in `path` durable (a no-op where folders cannot be opened)."""
    if os.name == "nt":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a temp file beside `path`, fsync it, rename it over `path`, fsync
    the folder. On any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
