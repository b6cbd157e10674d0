"""Checkpoint directories of a run: naming, listing, the atomic commit, keep-last-N, and
whether a checkpoint's config fits the run's.

Layout: ``<run_dir>/checkpoints/step_00000100/`` (a sharded checkpoint, ``dist_checkpoint.py``;
older single-process runs wrote ``state.pt`` there, still read by ``checkpoint_formats.py``).
A checkpoint is written into ``step_....tmp`` and renamed into place, so a crash mid-write
leaves the previous checkpoints intact and never a partial one under a final name.  Files
are fsynced around the rename; pruning renames a checkpoint away before deleting it.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


from ..config import upgrade_saved_config
from ..outputs import fsync_dir

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, or from an incompatible config)."""


# -- directories ---------------------------------------------------------------------------
def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def remove_checkpoint(path: Path) -> None:
    """Prune atomically: rename first, so a kill mid-delete never leaves a half checkpoint under
    a final name (the ``.del`` leftover is cleaned at the next start)."""
    doomed = path.with_name(f"{path.name}.del-{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and ((p / "state.pt").is_file() or (p / ".metadata").is_file())]  # single-process or DCP
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_to_resume(run_dir: str | Path, mode: str) -> Path | None:
    """``training.resume``: "none" → None, "auto" → the latest in run_dir (or None), else a path."""
    if mode == "none":
        return None
    return latest_checkpoint(run_dir) if mode == "auto" else Path(mode)


def commit_checkpoint(tmp: Path, final: Path, old: Path) -> None:
    """Rename a fully written ``tmp`` into place (a re-save of the same step, e.g. the final save
    after an interval save, moves the existing one to ``old`` first) and make it durable."""
    if final.exists():
        final.rename(old)
    tmp.rename(final)  # the commit point
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def undo_save(tmp: Path, old: Path, final: Path) -> None:
    """A failed save leaves what was there: the temporary directory goes, a moved-away copy
    of the same step comes back."""
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not final.exists():
        old.rename(final)


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: Path) -> None:
    """Keep the newest ``keep_last`` checkpoints, and always ``keep`` (the one just written).
    A checkpoint that cannot be removed now stays (pruned at a later save): never fatal."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != keep:
            try:
                remove_checkpoint(old)
            except OSError:
                pass


def describe_differences(diffs: list[str]) -> str:
    """The first difference in full, then the other differing keys by name (one changed field
    can move derived ones too: hidden_size changes a resolved head_dim)."""
    rest = [d.split(":", 1)[0] for d in diffs[1:]]
    return diffs[0] + (f" (+{len(rest)} more: {', '.join(rest)})" if rest else "")


def config_differences(saved: dict, current: dict, sections=("model", "recipe", "gemm")) -> list[str]:
    """Dotted keys whose values differ in the sections that decide the parameter layout/math
    (``saved``: a checkpoint's config, of this or an older layout)."""
    saved = upgrade_saved_config(saved)
    diffs = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}")
        elif a != b:
            diffs.append(f"{prefix}: checkpoint has {a!r}, config has {b!r}")

    for s in sections:
        walk(saved.get(s), current.get(s), s)
    return diffs
