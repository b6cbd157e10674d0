"""What the CUDA tests share: the device under test, bit and bound checks, a recording backend.

The tests: tests/test_cuda_quantizer.py, test_cuda_linear.py, test_cuda_training.py (the
quantizer, QuantizedLinear and SR checkpoints, training on a GPU agree with the CPU).

    python -m pytest -m cuda tests/                   # on a machine with one CUDA GPU (or more:
                                                      # CUDA_VISIBLE_DEVICES=N picks one; cuda:0 is used)
    bash scripts/gpu_check.sh                         # these tests + 20-step runs per recipe + bench

Every test carries the ``cuda`` marker and is *skipped* (with the reason) when
``torch.cuda.is_available()`` is False, so a CPU run reports them as skipped rather than
leaving them out.

``MEGATRON_UFP4_TEST_DEVICE`` chooses the device under test (default ``cuda``; ``cuda:N``
works too).  ``MEGATRON_UFP4_TEST_DEVICE=cpu`` is a logic dry run on a CPU-only machine:
every test runs with the "device" side on the CPU as well, so the comparisons are trivial
but every API call, shape, tolerance and training path is exercised.  Use it after editing
this file on a machine without a GPU.

What "equal" means here:

* The quantizer is elementwise arithmetic (scales, division or multiplication, rounding,
  SR hashes): CUDA must give the same bits as the CPU — codes, stored scales, decode
  scales and fake-quantized values, for every format, RTNE and SR with the same key.
* The RHT is the reference butterfly (fp4/hadamard.py: fixed-order fp32 adds, one scale), so
  it too must give the CPU's bits for every size on any input.  Some tests still use dyadic
  inputs and ``rht_size: 16`` (written when the rotation was a matmul); they remain valid.
* GEMM outputs are checked against a float64 GEMM of the very operands that device
  quantized (recorded by a backend that wraps the emulated one), with the fp32
  accumulation error bound derived at ``gemm_error_bound``.

Known ways for a device to differ, which these tests are there to catch: CUDA eager computes
``tensor / python_float`` as a multiplication by the fp32 reciprocal (the CPU divides: the
two differ by an ulp for about a third to a half of the values when the divisor is 6 or 7);
Triton code from torch.compile divides approximately (``div.full.f32``) unless inductor's
``eager_numerics.division_rounding`` is on, and a kernel may flush subnormals to zero
(``sample_input`` has a subnormal block, and an all-zero block gives E8M0 its 2^-127 scale).
"""
from __future__ import annotations

import os

import pytest
import torch
from error_bounds import U32

# cuBLAS needs this (before its first handle) for torch.use_deterministic_algorithms; harmless otherwise
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from megatron_ufp4.fp4.recipes import PRESETS
from megatron_ufp4.linear.backends import EmulatedBackend, get_backend, register_backend

DEVICE_ENV = "MEGATRON_UFP4_TEST_DEVICE"


def device_name_under_test() -> str:
    """The device under test as a ``training.device`` value: ``cuda`` (default), ``cuda:N`` or ``cpu``."""
    return os.environ.get(DEVICE_ENV, "cuda").strip() or "cuda"


def device_under_test() -> torch.device:
    return torch.device(device_name_under_test())


def _skip_reason() -> str | None:
    name = device_name_under_test()
    if name == "cpu":
        return None  # the logic dry run
    if not name.startswith("cuda"):
        return f"{DEVICE_ENV}={name!r}: expected cuda, cuda:N or cpu"
    if not torch.cuda.is_available():
        return (f"no CUDA GPU visible (torch.cuda.is_available() is False; torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); {DEVICE_ENV}=cpu runs these tests' logic on the CPU")
    index = torch.device(name).index
    if index is not None and index >= torch.cuda.device_count():
        return f"{DEVICE_ENV}={name}: only {torch.cuda.device_count()} GPU(s) visible"
    return None


SKIP = _skip_reason()
# every CUDA test module: pytestmark = CUDA_MARKS
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

DRY_RUN = device_name_under_test() == "cpu"
RECIPES = list(PRESETS)  # bf16, ufp4, e2m1_ref, nvfp4, mxfp4


@pytest.fixture(autouse=True)
def ieee_fp32_matmul():
    """fp32 GEMMs in full fp32 (no TF32) while a test runs: the error bounds below assume it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# -- helpers ---------------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor on the CPU (signed zeros and NaN payloads compare too)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.uint8, torch.int8, torch.bool):
        return t.view(torch.uint8)
    if t.element_size() == 1:  # float8_e4m3fn / float8_e8m0fnu: no torch.equal on every build
        return t.view(torch.uint8)
    if t.dtype in (torch.float32, torch.int32):
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16, torch.int16):
        return t.view(torch.int16)
    return t.view(torch.int64) if t.element_size() == 8 else t


def assert_bits_equal(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    if want is None or got is None:
        assert got is None and want is None, f"{what}: one side is None"
        return
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    a, b = bits(got), bits(want)
    diff = a != b
    if bool(diff.any()):
        i = tuple(int(v) for v in diff.nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} elements differ; first at {i}: "
                             f"device {got.detach().cpu()[i]!r} vs cpu {want.detach().cpu()[i]!r}")


def sample_input(shape, seed: int = 0) -> torch.Tensor:
    """Gaussian values with outliers, an all-zero 32-block, -0.0, tiny and subnormal blocks (CPU, fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x.view(-1)[:: 97] *= 40.0  # outliers: saturation and big scale spreads
    x[0, :32] = 0.0  # a zero block (scale 0 / amax 0 paths)
    x[1, 3] = -0.0
    x[2, :16] *= 1e-30  # tiny scales
    x[3, :32] *= 1e-40  # subnormal values and scales (a kernel that flushes denormals differs here)
    return x


def dyadic(shape, seed: int, exp: int) -> torch.Tensor:
    """Integers in [-64, 64] times 2^-exp.  A size-16 RHT of such values is exact in fp32 in any
    summation order (entries +-1/4: products k * 2^-(exp+2) and sums of 16 of them need
    <= 13 significant bits), so CPU and CUDA rotate them to the same bits."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 65, shape, generator=g).float().mul_(2.0 ** -exp)


def gemm_error_bound(a: torch.Tensor, b: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """|fl32(A @ B^T) - (A @ B^T)| <= gamma_K * (|A| @ |B|^T) elementwise, gamma_K = K u / (1 - K u).

    Derivation: each output is a dot product of K terms a_k b_k.  With rounding to nearest
    (u = 2^-24), any evaluation order of the sum -- sequential, pairwise, blocked, split-K
    with a final reduction, or with fused multiply-adds (which only drop roundings) --
    gives fl(sum) = sum_k a_k b_k (1 + t_k) with |t_k| <= gamma_K (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., section 3.1: a product and at most K - 1
    additions touch each term), hence the bound.  ``extra`` adds terms summed into the same
    result after the GEMM (the bias: K -> K + 1).  TF32 would break it (10-bit mantissas);
    the ``ieee_fp32_matmul`` fixture turns TF32 off.  Underflow adds an absolute error of at
    most half the subnormal spacing (2^-150) per rounding, so at most K * 2^-149 in all
    (Higham section 2.1, fl(x op y) = (x op y)(1 + d) + e).  The reference A @ B^T is float64,
    whose own error (2^-53 relative) is far below the bound."""
    k = a.shape[-1] + extra
    gamma = k * U32 / (1 - k * U32)
    return gamma * (a.double().abs() @ b.double().abs().T) + k * 2.0 ** -149


def assert_within_bound(got: torch.Tensor, ref64: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    err = (got.detach().cpu().double() - ref64).abs()
    bad = ~(err <= bound)  # NaN fails too
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} outputs exceed the fp32 GEMM bound; first "
                             f"at {i}: |{float(got.detach().cpu()[i])} - {float(ref64[i])}| > {float(bound[i])}")


class RecordingBackend(EmulatedBackend):
    """The emulated backend, recording every GEMM's quantized operands and SR keys (on the CPU)."""

    def __init__(self):
        super().__init__(fused=False)
        self.name = "cuda_test_recording"
        self.calls: list[dict] = []
        self._keys: list = []

    def quantize(self, op, stats=None):
        self._keys.append(op.sr_key)
        return super().quantize(op, stats)

    def matmul(self, qa, qb):
        self.calls.append({"a": qa.detach().cpu().clone(), "b": qb.detach().cpu().clone(),
                           "keys": tuple(self._keys[-2:])})
        return super().matmul(qa, qb)

    def quantize_grouped(self, op):
        self._keys.append(op.sr_keys)
        return super().quantize_grouped(op)

    def grouped_matmul(self, qa, qb, sizes):
        self.calls.append({"a": qa.detach().cpu().clone(), "b": qb.detach().cpu().clone(), "sizes": tuple(sizes),
                           "keys": tuple(self._keys[-2:])})
        return super().grouped_matmul(qa, qb, sizes)

    def take(self) -> list[dict]:
        calls, self.calls, self._keys = self.calls, [], []
        return calls


REC = "cuda_test_recording"


@pytest.fixture(scope="module", autouse=True)
def recording_backend():
    """Registered while this module's tests run (not at import: skipped tests, and the rest of
    the session, see only the real backends)."""
    from megatron_ufp4.linear import backends

    register_backend(REC, RecordingBackend)
    try:
        yield
    finally:
        backends._REGISTRY.pop(REC, None)
        backends._INSTANCES.pop(REC, None)


def recorder() -> RecordingBackend:
    rec = get_backend(REC)
    rec.take()
    return rec


