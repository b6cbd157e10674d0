"""The Triton kernels compile for real GPU targets (sm_90 Hopper, sm_100 Blackwell), on a CPU.

The interpreter tests (test_triton_backend.py) prove the kernels' bits, but the interpreter
accepts constructs the compiler rejects (a ``tl.constexpr`` name rebound in each step of a
``tl.static_range`` made every RHT configuration fail to compile).  Here the configurations
the launchers make are recorded from the launchers themselves (linear/triton_aot.py) and
compiled by ``tools/compile_kernels.py --subset suite`` with Triton's compiler and bundled
ptxas, in a process without ``TRITON_INTERPRET``: the row kernel for every format (2-D
blocks, E8M0 floor / rceil, nvint4 included) x rounding with the RHT, one unrotated case,
pair, packed and grouped (both axes) launches for int4 and nvfp4, NVFP4's tensor-amax
pre-pass.  The full matrix (every format in every kernel, RHT 128, bf16 output, no RHT) is
the tool's default.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_launcher_matrix_covers_every_kernel_variant():
    from megatron_ufp4.linear.triton_aot import launcher_matrix

    matrix = launcher_matrix("suite")  # (label of the launcher call, configuration): a call may launch two kernels
    labels = " | ".join(label for label, _ in matrix)
    for part in ("rows ", "packed ", "pair ", "grouped axis=0", "grouped axis=1", "nvfp4_2d", "nvint4",
                 "mxfp4_floor", "mxfp4_rceil", " sr", " rtne", "rht=16", "rht=32"):
        assert part in labels, part
    assert {cfg.kernel for _, cfg in matrix} == {"quantize_rows_kernel", "quantize_rowcol_kernel",
                                                       "tensor_amax_kernel"}
    for label, cfg in matrix:  # what a label says is what the launch compiles
        c = dict(cfg.constexprs)
        if label.startswith("rows ") and cfg.kernel == "quantize_rows_kernel":
            assert c["SR"] == (" sr " in label) and (c["N"] > 1) == ("rht=None" not in label), label
    assert len(launcher_matrix("full")) > len(launcher_matrix("quick")) > len(matrix)


@pytest.mark.slow
def test_every_kernel_configuration_compiles_for_hopper_and_blackwell(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO_ROOT), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "compile_kernels.py"), "--subset", "suite",
                           "--jobs", "2"], env=env, capture_output=True, text=True, timeout=900)
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| quantize_") or ln.startswith("| tensor_")]
    errors = [ln for ln in rows if "compile error" in ln]
    assert proc.returncode == 0 and not errors, "\n".join(errors) or proc.stderr[-2000:]
    compiled = [ln for ln in rows if ln.count("|") == 8 and "sm_" in ln.split("|")[3]]
    assert {ln.split("|")[3].strip() for ln in compiled} == {"sm_90", "sm_100"}
