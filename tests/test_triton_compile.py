"""The Triton kernels compile for real GPU targets (sm_90 Hopper, sm_100 Blackwell), on a CPU, lean.

The interpreter tests (test_triton_backend.py) prove the kernels' bits, but the interpreter
accepts constructs the compiler rejects (a ``tl.constexpr`` name rebound in each step of a
``tl.static_range`` made every RHT configuration fail to compile).  Here every configuration
the launchers make (linear/triton_aot.py records them from the launchers themselves: every
format incl. 2-D blocks, E8M0 floor / rceil and nvint4, x rounding x RHT size x output dtype,
packed (with and without values), pair, grouped along both axes, indices past 2^31, NVFP4's tensor-amax pre-pass) is
compiled by ``tools/compile_kernels.py`` with Triton's compiler and bundled ptxas, in a
process without ``TRITON_INTERPRET``, and must compile without a spill (ptxas -v) and, for
the quantizer kernels, in at most 128 registers per thread.
"""
from __future__ import annotations

import importlib.util

import pytest

import background

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_launcher_matrix_covers_every_kernel_variant():
    from megatron_ufp4.linear.triton_aot import launcher_matrix

    matrix = launcher_matrix("full")  # (label of the launcher call, configuration): a call may launch two kernels
    labels = " | ".join(label for label, _ in matrix)
    for part in ("rows ", "packed ", "codes nvfp4", "codes mxfp4", "pair ", "grouped axis=0", "grouped axis=1",
                 "nvfp4_2d", "nvint4", "mxfp4_floor", "mxfp4_rceil", " sr", " rtne", "rht=None", "rht=16", "rht=32",
                 "rht=128", " bf16", " sr wide"):
        assert part in labels, part
    assert {cfg.kernel for _, cfg in matrix} == {"quantize_rows_kernel", "quantize_rowcol_kernel",
                                                       "tensor_amax_kernel"}
    for label, cfg in matrix:  # what a label says is what the launch compiles
        c = dict(cfg.constexprs)
        if label.startswith("rows ") and cfg.kernel == "quantize_rows_kernel":
            assert c["SR"] == (" sr" in label) and (c["N"] > 1) == ("rht=None" not in label), label
            assert c["WIDE"] == label.endswith(" wide"), label
    assert len(matrix) > len(launcher_matrix("quick"))


@pytest.mark.slow
def test_every_kernel_configuration_compiles_for_hopper_and_blackwell_without_spills():
    # compiled in a background process started when this test was collected (tests/background.py)
    returncode, stdout, stderr = background.result("kernel_compile")
    rows = [ln.split("|")[1:-1] for ln in stdout.splitlines() if ln.startswith("| quantize_")
            or ln.startswith("| tensor_")]
    rows = [[c.strip() for c in r] for r in rows if len(r) == 11]  # the per-configuration table
    errors = [" | ".join(r) for r in rows if "compile error" in r[4]]
    # exit status 3: compiled, but something spilled (listed below)
    assert not errors and returncode in (0, 3), "\n".join(errors) or stdout[-3000:] + stderr[-2000:]
    assert {r[2] for r in rows} == {"sm_90", "sm_100"} and len(rows) >= 2 * 100
    spills = [" | ".join(r) for r in rows if r[5] != "0 / 0"]
    assert not spills, "\n".join(spills)
    fat = [" | ".join(r) for r in rows if r[0].startswith("quantize_") and int(r[4]) > 128]
    assert not fat, "\n".join(fat)
