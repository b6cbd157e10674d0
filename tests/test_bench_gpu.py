"""bench/bench_gpu.py runs end to end at tiny shapes on the CPU (the GPU numbers need a GPU)."""
from __future__ import annotations

import importlib.util
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


def _run(*args, cwd, **env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
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
    assert "### Quantizer kernels" not in text  # the CPU default is emulated only: no triton, no kernel section
    for recipe in PRESETS:
        rows = [line for line in text.splitlines() if line.startswith(f"| {recipe} |")]
        assert len(rows) == 2, (recipe, rows)  # one per table
        if recipe != "bf16":
            assert all("x)" in row for row in rows), rows  # a ratio against bf16 in every cell


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter on CPU)")
def test_bench_gpu_quantizer_kernels_in_the_interpreter(tmp_path):
    out = tmp_path / "bench.md"
    # the interpreter must be on before triton_kernels is first imported, hence the fresh process
    # two recipes keep the interpreter (~3 ms per program) well inside the timeout; they cover
    # both row kinds (RTNE and SR operands) and NVFP4's extra 16x16 weight-block format, and the
    # kernels' bits for every format are checked in test_triton_backend.py
    fp4 = ["ufp4", "nvfp4"]
    r = _run("--device", "cpu", "--small", "--backends", "triton", "--recipes", ",".join(fp4), "--out", str(out),
             cwd=tmp_path, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "failed" not in r.stdout and "failed" not in r.stderr, r.stderr[-2000:]
    text = out.read_text()
    section = text.split("### Quantizer kernels", 1)[1].split("\n### ", 1)[0]
    assert "70%" in section and "1.10x" in section  # the targets, in the caption
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| recipe")]
    assert rows[0].startswith("| copy | bf16, x.clone() |") and "100%" in rows[0], rows[:1]
    for recipe in fp4:  # one row per operand format: x (and w) with RTNE, dy with SR
        mine = [row.split(" | ")[2] for row in rows if row.startswith(f"| {recipe}: ")]
        assert "rtne" in mine and "sr" in mine, (recipe, mine)
    assert len(rows) == 1 + 2 * len(fp4) + 1  # + NVFP4's 16x16 weight blocks: a format of their own
    for row in rows[1:]:
        cells = row.strip("| ").split(" | ")
        assert len(cells) == 8 and cells[5].endswith("x"), row  # every path timed, the RHT ratio filled
        assert all(" ms, " in c and "GB/s" in c for c in (cells[3], cells[4], cells[6], cells[7])), row
    # the linear and stack tables ran the triton backend too (one row per FP4 recipe each)
    assert sum(line.startswith("| ufp4 | triton |") for line in text.splitlines()) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_bench_gpu_without_cuda_is_one_line(tmp_path):
    r = _run("--device", "cuda", "--small", cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is visible" in lines[0], r.stderr
