"""Durable, atomic writes of files and folders, and the filesystem faults of writers told in
one line. The one place in the package that renames anything into place.

Every writer of a file or folder that a reader may open (checkpoints, token shards, .pth and
GGUF exports, pipeline and benchmark reports) goes through the two primitives here, so each
leaves either the old version or the new one, never half of one, whatever kills it:

- `AtomicFile(path)`: the new content is written at a temp path beside `path` (same
  filesystem), then `commit()` fsyncs it, renames it over `path` and fsyncs the folder;
  `abort()` (or an exception in its `with` block) deletes the temp and leaves `path` as it
  was. `atomic_write(path, write)` is the one-call form for a writer that takes a file object.
- `AtomicFolder(path)`: the same for a whole folder (a checkpoint), which no single rename can
  replace; the transaction is described below. `read_snapshot` is its reader's half.

Folder transaction, with P the folder's path:
1. Writers of P take an advisory lock on the sibling file `.P.lock` (flock: the kernel drops it
   when the holder dies, even by SIGKILL), so every other `.P.tmp-*` sibling is a stale leftover
   of a dead writer and is deleted.
2. Everything is staged in the sibling folder `.P.tmp-<hex>` (same filesystem, so renames are
   atomic). On commit every staged file and folder is fsynced, then:
   rename P -> P.old, rename .P.tmp-<hex> -> P, rename P.old -> .P.tmp-<hex> and delete it,
   fsyncing the parent after each rename so the order survives a power cut too.
3. Invariants: P and P.old are each only ever created by one rename of a complete, fsynced
   folder, and a `.tmp-` name is never read. So whenever P exists it is complete, and when it
   is missing P.old is the last committed version (killed between the first two renames).
   Readers resolve P, else P.old (`committed_folder`). A writer that finds P missing and P.old
   present skips the first rename, so P.old is never lost.
A kill at any moment therefore leaves the previous (or the new) folder readable, never a
half-written one; the next commit removes the leftovers. Why two renames and a fallback: no
portable call replaces a non-empty folder in one step (rename(2) wants the target empty;
renameat2(RENAME_EXCHANGE) is Linux-only and not on every filesystem), and a symlink
`P -> P.v7` swapped by one rename would make P something other than a plain folder that users
copy, upload or open on Windows.
One writer per path at a time: the lock serialises writers, the last commit wins, and the empty
`.P.lock` file stays (deleting a lock file races its next taker). Readers take no lock: a read
notes the folder's (device, inode) and, if a commit swapped the folder meanwhile, reads again,
so it never mixes two versions (`read_snapshot`).

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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:  # POSIX advisory locks; on Windows folder writers are not serialised (one per path).
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

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


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file, then every folder bottom-up (a file's entry lives in its folder)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def make_dirs(folder: str | os.PathLike) -> None:
    """mkdir -p that fsyncs the parent of each folder it creates (durable like the rest)."""
    folder = Path(folder)
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)


# --- one file --------------------------------------------------------------------------------


class AtomicFile:
    """A file published whole: write at `.tmp`, then `commit()` (fsync, rename, fsync folder).

    `tmp` defaults to a fresh hidden name beside `path` (`.NAME.<random>.tmp`); a writer whose
    folder has its own clean-up rules may name it (token shards use `NAME.tmp`). Used as a
    context manager, it commits when the block ends normally and aborts on an exception::

        with AtomicFile(out) as f:
            some_library_writer(f.tmp)      # anything that writes a file at a path
    """

    def __init__(self, path: str | os.PathLike, tmp: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tmp is None:
            fd, name = tempfile.mkstemp(
                dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
            )
            os.close(fd)
            tmp = name
        self.tmp = Path(tmp)
        if self.tmp.parent.resolve() != self.path.parent.resolve():
            raise ValueError(
                f"{self.tmp} is not beside {self.path}: the rename would not be atomic"
            )

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> Path:
        """fsync the temp file, rename it over `path`, fsync the folder; -> `path`."""
        try:
            fsync_file(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Delete the temp file; `path` stays as it was."""
        self.tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a temp file beside `path`, fsync it, rename it over `path`, fsync
    the folder. On any error the temp file is removed and `path` is untouched."""
    with AtomicFile(path) as out, open(out.tmp, "wb") as f:
        write(f)
    return out.path


# --- one folder ------------------------------------------------------------------------------


def old_path(path: Path) -> Path:
    """P.old: where the previous version of folder P waits during a commit."""
    return path.with_name(path.name + ".old")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _temp_path(path: Path) -> Path:
    return path.with_name(_temp_prefix(path) + uuid.uuid4().hex[:16])


def _is_temp_of(path: Path, name: str) -> bool:
    # Exact pattern, so the temp folders of a folder named "a.tmp-x" are not taken for a's.
    return re.fullmatch(re.escape(_temp_prefix(path)) + "[0-9a-f]{16}", name) is not None


def committed_folder(path: str | os.PathLike) -> Path | None:
    """The folder to read for `path`: `path`, or `path.old` when a commit was killed between
    its two renames; None when neither is a folder."""
    p = Path(path)
    if p.is_dir():
        return p
    if old_path(p).is_dir():
        return old_path(p)
    return None


class AtomicFolder:
    """Stage a folder beside `path` and swap it in on commit (the transaction above).

        with AtomicFolder(path, check=refuse_foreign) as staging_owner:
            (staging_owner.staging / "a.json").write_text(...)
        # exit without an exception: commit (fsync, swap); with one: discard, P untouched

    `check(path)` runs before staging and again under the lock before the swap: it raises
    to refuse replacing what is at `path` (the swap deletes it). `before_commit(staging)` runs
    first in `commit`, to refuse an incomplete folder.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        check: Callable[[Path], None] | None = None,
        before_commit: Callable[[Path], None] | None = None,
    ):
        self.path = Path(path).absolute()
        self.check = check or (lambda _path: None)
        self.before_commit = before_commit or (lambda _staging: None)
        self.staging: Path | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> AtomicFolder:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> Path:
        """Lock the path, delete stale temps of dead writers, create the staging folder."""
        if self.staging is not None:
            raise RuntimeError(f"the writer of {self.path} is already open")
        self.check(self.path)
        make_dirs(self.path.parent)
        self._lock()
        try:
            self._tidy()
            self.staging = _temp_path(self.path)
            self.staging.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self.staging

    def commit(self) -> Path:
        """Make the staged folder the folder at `path`; -> `path`."""
        if self.staging is None:
            raise RuntimeError(f"the writer of {self.path} is not open")
        staging = self.staging
        try:
            self.before_commit(staging)
            self.check(self.path)  # again, under the lock
            fsync_tree(staging)
            path, old, parent = self.path, old_path(self.path), self.path.parent
            if path.exists():
                if old.exists():  # stale: a killed writer renamed P in after P -> P.old
                    self._discard(old)
                os.replace(path, old)
                fsync_dir(parent)
            # Killed here: P is missing and P.old is complete; readers fall back to it.
            os.replace(staging, path)
            fsync_dir(parent)
            self.staging = None
            # Committed already: a failed clean-up is left to the next commit, not an error.
            with contextlib.suppress(OSError):
                self._tidy()  # P.old -> temp name -> deleted
            return path
        except BaseException:
            self.abort()
            raise
        finally:
            self._unlock()

    def abort(self) -> None:
        """Discard the staged folder; the folder at `path` is left as it was."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        self._unlock()

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another writer of P is alive
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _discard(self, folder: Path) -> None:
        # Rename to a temp name first (one atomic step), so a kill during the slow delete
        # leaves a temp that the next writer removes, never a partial P.old.
        trash = _temp_path(self.path)
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _tidy(self) -> None:
        """Under the lock: delete temps of dead writers and a P.old made redundant by P."""
        old = old_path(self.path)
        if self.path.exists() and old.exists():
            self._discard(old)
        for entry in self.path.parent.iterdir():
            if _is_temp_of(self.path, entry.name) and entry != self.staging:
                shutil.rmtree(entry, ignore_errors=True)


class FolderChangedError(RuntimeError):
    """A folder was replaced by commits on every attempt to read it."""


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def read_snapshot(
    path: str | os.PathLike,
    read: Callable[[Path], Any],
    resolve: Callable[[Path], Path],
    attempts: int = 10,
) -> Any:
    """read(folder) on `resolve(path)` (P or P.old), as one consistent snapshot.

    A commit that races the read renames the folder away (P -> P.old -> deleted, a new folder
    at P): the folder's identity (device, inode) changes. Then a file may vanish mid-read, or
    the read may mix two versions, so it is retried on the new folder. An error raised while
    the folder stayed the same is the read's own and propagates.
    """
    for _ in range(attempts):
        folder = resolve(Path(path))
        before = _identity(folder)
        if before is None:  # renamed away between resolve and stat: resolve again
            continue
        try:
            result = read(folder)
        except Exception:
            if _identity(folder) != before:
                continue
            raise
        if _identity(folder) == before:
            return result
    raise FolderChangedError(f"{path} changed {attempts} times while being read")
