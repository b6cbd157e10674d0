"""bench/bench_gpu.py runs end to end at tiny shapes on the CPU (the GPU numbers need a GPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

try:  # tests/ as a package (with __init__.py) or as a plain directory on sys.path
    from .conftest import REPO_ROOT
except ImportError:
    from conftest import REPO_ROOT
from megatron_ufp4.fp4.recipes import PRESETS

BENCH = REPO_ROOT / "bench" / "bench_gpu.py"


def _run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_bench_gpu_small_on_cpu(tmp_path):
    out = tmp_path / "results" / "bench.md"
    r = _run("--device", "cpu", "--small", "--out", str(out), cwd=tmp_path)  # not the repo dir: runs from anywhere
    assert r.returncode == 0, r.stderr[-2000:]
    assert "failed" not in r.stdout and "failed" not in r.stderr, r.stderr[-2000:]
    text = out.read_text()
    assert text.strip() in r.stdout
    assert "### QuantizedLinear forward + backward" in text and "### Training step of 2 dense-1.5b-width layers" in text
    for recipe in PRESETS:
        rows = [line for line in text.splitlines() if line.startswith(f"| {recipe} |")]
        assert len(rows) == 2, (recipe, rows)  # one per table
        if recipe != "bf16":
            assert all("x)" in row for row in rows), rows  # a ratio against bf16 in every cell


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_bench_gpu_without_cuda_is_one_line(tmp_path):
    r = _run("--device", "cuda", "--small", cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is visible" in lines[0], r.stderr
