"""What the checkpoint-safety tests attack checkpoints with, and how they run the CLIs:
pickle payloads that execute code, a poisoned ``state.pt``, damage to a sharded checkpoint,
the conversion tool, two-rank torchrun launches and their one-line error check."""
from __future__ import annotations

import builtins
import importlib.util
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from conftest import CONFIGS, REPO_ROOT

# the repository on the path: the subprocesses run from other directories (tmp_path)
# PYTHONFAULTHANDLER: a rank that dies of a signal prints every thread's Python stack to stderr
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
       "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# -- payloads ------------------------------------------------------------------------------------------
class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


PAYLOADS = {"os.system": _System, "exec": _Exec}
REFUSED_NAME = {"os.system": "posix.system", "exec": "builtins.exec"}


def _evil_state_pt(path: Path, payload) -> None:
    """A torch.save zip (so torch.load takes its normal path) whose data.pkl runs ``payload``."""
    buf = io.BytesIO()
    torch.save({"model": {}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as out:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps({"model": payload, "config": {}, "step": 1}, protocol=2)
            out.writestr(item, data)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO_ROOT / "tools" / "convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _copy_run(ckpt: Path, tmp_path: Path) -> Path:
    """A run dir holding only a copy of checkpoint ``ckpt``; returns the copy's checkpoint dir."""
    dst = tmp_path / "run" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, dst)
    return dst


def _damage(ckpt: Path, what: str) -> str:
    """Apply ``what`` to ``ckpt``; returns a substring the one-line error must contain."""
    data = ckpt / "__0_0.distcp"
    if what == "truncated_distcp":
        data.write_bytes(data.read_bytes()[:1000])
        return f"{data} is truncated: 1000 bytes"
    if what == "garbage_distcp":
        data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))
        return f"cannot read {data}: damaged"
    if what == "missing_distcp":
        data.unlink()
        return f"checkpoint {ckpt} lacks __0_0.distcp, which its .metadata lists"
    if what == "truncated_metadata":
        meta = ckpt / ".metadata"
        meta.write_bytes(meta.read_bytes()[:3000])
        return f"cannot read {meta}: damaged"
    if what == "missing_partitions":
        (ckpt / "partitions.json").unlink()
        return "partitions.json"
    raise AssertionError(what)


DAMAGE = ["truncated_distcp", "garbage_distcp", "missing_distcp", "truncated_metadata", "missing_partitions"]


# -- torchrun ----------------------------------------------------------------------------------------
_AGENT_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # torchrun's own log lines (its failure summary follows)


def _torchrun(overrides, *extra, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megatron_ufp4.train", str(CONFIGS / "tiny_dense.yaml"), *overrides, *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _rank_lines(err: str) -> list[str]:
    """What the ranks printed: stderr up to torchrun's report of the failed job."""
    out = []
    for line in err.splitlines():
        if _AGENT_LOG.match(line):
            break
        if line.strip():
            out.append(line)
    return out


def _assert_one_rank_line(proc, needle: str) -> None:
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert not re.search(r"^\[rank\d+\]", proc.stderr, re.M), proc.stderr[-3000:]  # no rank traceback
    lines = _rank_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-3000:]


def _tp2(overrides, run: Path) -> list[str]:
    return [*[o for o in overrides if not o.startswith("training.run_dir=")], f"training.run_dir={run}",
            "parallel.tensor=2", "training.eval_interval=0"]
