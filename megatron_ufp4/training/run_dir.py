"""The run directory: one training at a time, never silently overwritten, no leftovers.

* ``RunDirLock`` takes an exclusive lock on ``<run_dir>/.lock`` (``fcntl.flock``): the
  kernel drops it when the process ends in any way, kill -9 included, so a stale lock
  never blocks a restart.  A second training in the same directory is refused with one
  line naming the holder's PID.  The same process may take it again (tests build several
  trainers in one process): it is counted, and dropped when the last holder releases it.
* ``check_fresh_start`` refuses to start a run over another one (metrics or checkpoints
  that are not the ones being resumed) unless ``training.overwrite`` is set, which moves
  the old run aside to ``<run_dir>.old-<time>``: nothing is ever deleted.
* ``clean_leftovers`` removes what a killed save or prune left behind (temporary and
  half-deleted checkpoint directories); it runs under the lock, so no live writer owns them.
* ``discarded_if_refused`` creates the directory for a start and removes it again if the
  start is refused (a directory that existed before is never removed).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import time
from pathlib import Path

from .checkpoint import STEP_DIR, CheckpointError, checkpoint_root, list_checkpoints
from ..outputs import fsync_dir, os_error_line

LOCK_NAME = ".lock"
# what a killed writer can leave next to the step directories
# a killed save, re-save or prune; or the sharded copy of a single-file checkpoint being loaded
LEFTOVER = re.compile(r"^(step_\d{8}\.(tmp|old|del)(-\d+)?|\.staged-\d+)$")


class RunDirError(CheckpointError):
    """The run directory cannot be used as asked (locked, holds another run, not writable)."""


def make_run_dir(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"training.run_dir {p} is not writable: {os_error_line(e, str(p))}") from None
    return p


@contextlib.contextmanager
def discarded_if_refused(run_dir: str | Path):
    """``make_run_dir``; if the block raises and the directory did not exist before, it is
    removed again (with whatever the refused start put there), so a refused training start
    leaves nothing behind.  An existing directory is never removed."""
    p = Path(run_dir)
    fresh = not p.exists()
    made = make_run_dir(p)
    try:
        yield made
    except BaseException:
        if fresh:
            release_locks(made)
            shutil.rmtree(made, ignore_errors=True)
        raise


def check_init_from(path: str | None) -> None:
    """``training.init_from`` must exist before a run starts from it (never silently ignored)."""
    if path and not Path(path).exists():
        raise RunDirError(f"training.init_from {path}: no such checkpoint (file or directory)")


# path -> [fd, holders]: flock belongs to an open file, so a second acquire in this process
# must reuse the descriptor (a second open would conflict with our own lock)
_HELD: dict[str, list] = {}


class RunDirLock:
    def __init__(self, run_dir: str | Path, field: str = "training.run_dir", what: str = "training"):
        self.path = Path(run_dir) / LOCK_NAME
        self.key = os.path.realpath(self.path)
        self.held = False
        self.field, self.what = field, what  # how the refusal names the directory and its holder

    def acquire(self) -> "RunDirLock":
        if self.key in _HELD:  # this process holds it already (several trainers in one process)
            _HELD[self.key][1] += 1
            self.held = True
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            raise RunDirError(f"{self.field} {self.path.parent} is in use by another {self.what} "
                              f"(PID {self.holder() or '?'} holds {self.path}); wait for it or use another "
                              f"{self.field.rsplit('.', 1)[-1]}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[self.key] = [fd, 1]
        self.held = True
        return self

    def holder(self) -> int | None:
        try:  # reading through another descriptor leaves a flock alone
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = _HELD[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.key]
            os.close(entry[0])  # closing the last descriptor drops the lock


def run_artifacts(run_dir: Path) -> list[str]:
    """What marks a directory as holding a run (leftovers and the lock do not)."""
    found = [p.name for p in list_checkpoints(run_dir)]
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:
        found.append("metrics.jsonl")
    return found


def check_fresh_start(run_dir: Path, resume_mode: str, resume_from: Path | None, overwrite: bool,
                      console=print) -> None:
    """Refuse (or, with overwrite, move aside) a run that this start would clobber.

    Continuing is fine: resuming from this run_dir's latest checkpoint, or
    ``resume=auto`` in a run_dir with no checkpoint yet (a run killed before its first save:
    starting over is its continuation, and its metrics past step 0 would be dropped on any
    resume).  Anything else (``resume=none``, or a checkpoint from elsewhere) into a
    directory that holds checkpoints or metrics would truncate its metrics and let its
    higher-numbered checkpoints win ``keep_last`` over the new ones.
    """
    found = run_artifacts(run_dir)
    latest = list_checkpoints(run_dir)[-1:] or [None]
    if resume_from is not None and resume_from.is_file():  # .../step_N/state.pt means step_N
        resume_from = resume_from.parent
    continuing = (resume_from is not None and latest[0] is not None
                  and resume_from.resolve() == latest[0].resolve()) or (resume_mode == "auto" and latest[0] is None)
    if not found or continuing:
        return
    if not overwrite:
        raise RunDirError(f"training.run_dir {run_dir} already holds a run ({', '.join(found[-3:])}): resume it "
                          "with training.resume=auto, choose another run_dir, or set training.overwrite=true "
                          "to move it aside")
    if resume_from is not None and run_dir.resolve() in resume_from.resolve().parents:
        raise RunDirError(f"training.resume={resume_from} lies inside training.run_dir {run_dir}, which "
                          "training.overwrite=true would move aside: copy the checkpoint out first")
    run_dir = run_dir.resolve()
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 0
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    aside.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            entry.rename(aside / entry.name)
    fsync_dir(run_dir)
    console(f"moved the previous run in {run_dir} to {aside}")


def _complete(path: Path) -> bool:
    return (path / "state.pt").is_file() or (path / ".metadata").is_file()


def clean_leftovers(run_dir: Path, console=print) -> list[str]:
    """Delete temporary / half-written / half-pruned checkpoint directories (call under the lock).

    One leftover is kept: a save that re-writes step N moves the old ``step_N`` to
    ``step_N.old`` before renaming the new one into place; a kill between the two renames
    leaves ``.old`` as the only complete copy, so it is renamed back.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    for entry in sorted(root.iterdir()):
        m = LEFTOVER.match(entry.name)
        final = root / entry.name.split(".")[0]
        if m and m.group(2) == "old" and not final.exists() and _complete(entry):
            entry.rename(final)
            console(f"restored checkpoint {final} from {entry.name} (a save was interrupted)")
    complete = {p.name for p in list_checkpoints(run_dir)}
    removed = []
    for entry in sorted(root.iterdir()):
        partial = STEP_DIR.match(entry.name) and entry.name not in complete
        if entry.is_dir() and (LEFTOVER.match(entry.name) or partial):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        console(f"removed {len(removed)} incomplete checkpoint director{'y' if len(removed) == 1 else 'ies'} "
                f"left by an interrupted run: {', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}")
    return removed


def release_locks(run_dir: str | Path) -> None:
    """Drop this process's lock on ``run_dir`` however many holders took it (a refused start)."""
    entry = _HELD.pop(os.path.realpath(Path(run_dir) / LOCK_NAME), None)
    if entry is not None:
        os.close(entry[0])
