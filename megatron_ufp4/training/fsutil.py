"""File-system helpers for crash-safe writes: fsync around atomic renames, atomic deletes,
one-line descriptions of failed writes."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def os_error_line(e: OSError, what: str) -> str:
    """One line for a failed write: the file, the reason, and for a full disk say so plainly."""
    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
    where = e.filename or what
    return f"{where}: {reason}"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot sync directories; the data itself is synced
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_checkpoint(path: Path) -> None:
    """Prune atomically: rename first, so a kill mid-delete never leaves a half checkpoint under
    a final name (the ``.del`` leftover is cleaned at the next start)."""
    doomed = path.with_name(f"{path.name}.del-{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class SyncedWriter:
    """A binary file for ``torch.save``: leaving the ``with`` block fsyncs, and a failed write
    comes out as ``OSError`` with its errno and file name.  (torch's zip writer swallows the
    exception a Python ``write`` raises and reports "unexpected pos" instead; the real error
    is kept here and re-raised in its place.)"""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.path = path
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                self.error = OSError(e.errno, e.strerror, str(self.path))
                raise self.error from None
            view = view[n:]
        return total

    def flush(self) -> None:
        pass

    def __enter__(self) -> "SyncedWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        try:
            if exc_type is not None and self.error is not None:
                raise self.error from None
            if exc_type is None:
                try:
                    os.fsync(self.fd)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, str(self.path)) from None
        finally:
            os.close(self.fd)


def write_synced(path: Path, text: str) -> None:
    with SyncedWriter(path) as f:
        f.write(text.encode("utf-8"))
