"""Writing a command's outputs without losing anything: the one owner of that rule.

Every command that writes a file or directory a user named (eval / sample ``--json``, data
prepare, the checkpoint converter, HF export and import, plots) goes through here:

- ``check_output`` refuses, in one line naming the flag that allows it, an output that
  already exists, and always refuses one that is (or is inside) an input of the same
  command: ``eval RUN --json RUN/checkpoints/step_N/state.pt`` must not replace the
  checkpoint it reads, whatever the flags say.
- ``atomic_file`` / ``atomic_dir`` write under a temporary sibling name and rename it into
  place only when complete; on any failure (bad input, a full disk, Ctrl-C) the temporary is
  removed and whatever was there before is untouched.
- ``Outputs`` does the same for a group of files that belong together (a dataset's ``.bin``,
  ``.idx``, tokenizer and ``.json``): nothing of the group is replaced until every new file is
  complete.

The low-level pieces live here too: ``fsync_file`` / ``fsync_dir`` (a rename is durable only
once its directory is synced), ``SyncedWriter`` (a file object for ``torch.save`` that keeps
the real errno of a failed write) and ``os_error_line``.

Files a command manages itself (a study's report in its ``out_dir``, a run's metrics) are
regenerated on purpose and use ``atomic_file`` alone.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator


# -- crash-safe writes: fsync around atomic renames, real errors from torch.save ------------------------
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


class OutputError(ValueError):
    """An output that would clobber something (one line, naming the path and the flag)."""


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output(path: str | Path, *, overwrite: bool = False, flag: str = "--overwrite",
                 inputs: Iterable[str | Path] = (), units: Iterable[str | Path] = (), what: str = "output",
                 make_parents: bool = False) -> Path:
    """``path`` as an output this command may write, or an ``OutputError``.

    Refused: an existing path unless ``overwrite`` (the message names ``flag``); always, a path
    that is one of ``inputs`` or contains one, or lies inside one of ``units`` (inputs read as
    a whole, such as a checkpoint directory: a new file there would change it); a missing
    parent directory unless the command creates it (``make_parents``)."""
    p = Path(path)
    resolved = p.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if _inside(s, resolved):
            raise OutputError(f"{what} {p} is (or contains) an input of this command ({src}); choose another path")
    for unit in units:
        if _inside(resolved, Path(unit).resolve()):
            raise OutputError(f"{what} {p} is (or is inside) an input of this command ({unit}); choose another path")
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise OutputError(f"{what} {p} already exists; pass {flag} to replace it")
    if not make_parents and not resolved.parent.is_dir():
        raise OutputError(f"{what} {p}: directory {p.parent} does not exist")
    return p


def _tmp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; renamed onto ``path`` (fsynced) when the
    block completes, removed if it raises (anything, KeyboardInterrupt included)."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        _remove(tmp)


def write_text(path: str | Path, text: str) -> None:
    """``path``'s new contents, all or nothing (``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path`` (an
    old ``path`` is moved aside first and deleted only after the rename), on failure it goes."""
    path = Path(path)
    tmp, old = _tmp_sibling(path), _tmp_sibling(path, "old")
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        _remove(old)
    finally:
        _remove(tmp)
        if old.exists() and not path.exists():  # the final rename failed: put the old one back
            os.replace(old, path)


class Outputs:
    """Several files of one directory written as one output (a dataset's token files, tokenizer
    and ``.json``): everything is written into a temporary directory beside them
    (``path(final)`` gives the name to write ``final`` under; a file written there under any
    other name, e.g. a tokenizer's ``.vocab`` companion, belongs to the output too);
    ``commit()`` moves every file into place once all are complete; leaving the ``with``
    block without ``commit()`` (an error, a signal) removes the temporary directory and
    touches no final file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.tmp = _tmp_sibling(self.directory / "outputs")

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        if final.parent.resolve() != self.directory.resolve():
            raise ValueError(f"{final} is not in {self.directory}")
        return self.tmp / final.name

    def commit(self) -> list[Path]:
        moved = []
        for f in sorted(self.tmp.iterdir()):
            os.replace(f, self.directory / f.name)
            moved.append(self.directory / f.name)
        fsync_dir(self.directory)
        return moved

    def __enter__(self) -> "Outputs":
        _remove(self.tmp)
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, *exc) -> None:
        _remove(self.tmp)


__all__ = ["OutputError", "Outputs", "SyncedWriter", "atomic_dir", "atomic_file", "check_output", "fsync_dir",
           "fsync_file", "os_error_line", "write_synced", "write_text"]
