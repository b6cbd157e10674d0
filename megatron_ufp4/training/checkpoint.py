"""Single-process checkpoints: atomic directories, keep-last-N, everything needed for an
exact resume (model incl. SR generators and RHT signs, optimizer, step, data position,
all RNG states, resolved config).

Layout: ``<run_dir>/checkpoints/step_00000100/{state.pt, config.yaml}``.  A checkpoint is
written into ``step_...tmp-<pid>`` and renamed into place, so a crash mid-write leaves the
previous checkpoints intact and never a partial one under a final name.  Loading uses
``torch.load(weights_only=True)``.  Files are fsynced around the rename; pruning renames a
checkpoint away before deleting it.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import upgrade_saved_config
from ..outputs import SyncedWriter, fsync_dir, os_error_line, write_synced

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, or from an incompatible config)."""


# -- RNG states in weights_only-loadable form ------------------------------------------------
def capture_rng() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        # as many GPUs as both machines have: a checkpoint may come from a node with more or fewer
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


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


def save_checkpoint(run_dir: str | Path, step: int, state: dict, config_yaml: str, keep_last: int,
                    _before_rename=None) -> Path:
    """Write ``state`` atomically as checkpoint ``step`` and prune to ``keep_last``.

    Files are fsynced before the rename and the directory after it, so a power cut never
    leaves a renamed checkpoint with unwritten data.  A failed write (disk full, read-only
    file system) raises ``CheckpointError`` with one line naming the file and the previous
    checkpoint, which is untouched.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    old = root / f"{final.name}.old-{os.getpid()}"
    previous = latest_checkpoint(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with SyncedWriter(tmp / "state.pt") as f:  # write errors surface as OSError with their errno
            torch.save(state, f)
        write_synced(tmp / "config.yaml", config_yaml)
        fsync_dir(tmp)
        if _before_rename is not None:  # test hook: simulate a crash before the commit point
            _before_rename(tmp)
        commit_checkpoint(tmp, final, old)
    except OSError as e:
        _undo_save(tmp, old, final)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot save checkpoint step {step}: {os_error_line(e, str(tmp))}; {kept}") from None
    except BaseException:
        _undo_save(tmp, old, final)
        raise
    prune_checkpoints(run_dir, keep_last, keep=final)
    return final


def commit_checkpoint(tmp: Path, final: Path, old: Path) -> None:
    """Rename a fully written ``tmp`` into place (a re-save of the same step, e.g. the final save
    after an interval save, moves the existing one to ``old`` first) and make it durable."""
    if final.exists():
        final.rename(old)
    tmp.rename(final)  # the commit point
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _undo_save(tmp: Path, old: Path, final: Path) -> None:
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


def load_checkpoint(path: str | Path) -> dict:
    """The state dict of a single-process checkpoint (directory or ``state.pt``).

    Loaded with ``torch.load(weights_only=True)``: a file that references anything else
    (code) is refused, naming the global.  Reading a key the file lacks (``optimizer``,
    ``rng``, ...; ``model`` / ``config`` / ``step`` also through ``.get``) raises
    ``CheckpointError("checkpoint FILE lacks 'optimizer'")``.
    """
    from .safe_load import load_state_file

    path = Path(path)
    f = path / "state.pt" if path.is_dir() else path
    if path.is_dir() and (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is a sharded (DCP) checkpoint: resume it under torchrun, or turn it into one "
                              "file with tools/convert_checkpoint.py to-single")
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return load_state_file(f)  # corrupt / foreign / unsafe file: one line, naming it


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


def init_weights_from(model, path: str | Path) -> None:
    """``training.init_from``: copy a checkpoint's model weights into ``model`` (weights only:
    the run keeps its own SR generators and RHT signs, optimizer and step).  The checkpoint
    (single-file or sharded) must hold exactly the model's weights, shape for shape; else
    one ``CheckpointError`` line naming the key."""
    from .dist_checkpoint import is_distributed_checkpoint, load_consolidated

    p = Path(path)
    src = (load_consolidated(p) if p.is_dir() and is_distributed_checkpoint(p) else load_checkpoint(p))["model"]
    own = model.state_dict()
    merged = {}
    for k, v in own.items():
        if k.endswith("_extra_state"):
            merged[k] = v
        elif k not in src:
            raise CheckpointError(f"training.init_from {p} lacks {k!r}, which the model has")
        elif tuple(src[k].shape) != tuple(v.shape):
            raise CheckpointError(f"training.init_from {p}: {k} has shape {tuple(src[k].shape)}, the model "
                                  f"{tuple(v.shape)}")
        else:
            merged[k] = src[k]
    extra = sorted(k for k in src if k not in own and not k.endswith("_extra_state"))
    if extra:
        raise CheckpointError(f"training.init_from {p} has {extra[0]!r}, which the model lacks")
    model.load_state_dict(merged)
