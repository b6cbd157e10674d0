"""CUDA checks: the quantizer, QuantizedLinear, SR checkpoints and training on a GPU agree with the CPU.

    python -m pytest -m cuda tests/test_cuda.py        # on a machine with one CUDA GPU (or more:
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
* The RHT is a small fp32 GEMM (blocks of n along the reduction axis times an n x n
  matrix), and GEMM summation order differs between cuBLAS and the CPU BLAS.  On inputs
  where that GEMM is exact (dyadic values, entries of R = +-1/4 for n = 16, see
  ``dyadic``) the quantized operands must still be bitwise equal; for RHT sizes whose
  matrix entries 1/sqrt(n) are not dyadic (n = 32: MXFP4's preset) the bitwise linear test
  uses ``rht_size: 16`` and a general-input test bounds the rotation error instead.
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

import importlib.util
import io
import math
import os

import pytest
import torch

# cuBLAS needs this (before its first handle) for torch.use_deterministic_algorithms; harmless otherwise
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

try:  # tests/ as a package (with __init__.py) or as a plain directory on sys.path
    from .conftest import assert_state_equal, quiet, read_metrics, snapshot
except ImportError:
    from conftest import assert_state_equal, quiet, read_metrics, snapshot
from megatron_ufp4.fp4 import RHT, fake_quantize, quantize
from megatron_ufp4.fp4.grouped import Segments, fake_quantize_grouped
from megatron_ufp4.fp4.recipes import PRESETS, Recipe
from megatron_ufp4.fp4.sr_random import SRIndex
from megatron_ufp4.linear import QuantizedLinear
from megatron_ufp4.linear.backends import EmulatedBackend, get_backend, register_backend

DEVICE_ENV = "MEGATRON_UFP4_TEST_DEVICE"


def _device_name() -> str:
    """The device under test as a ``training.device`` value: ``cuda`` (default), ``cuda:N`` or ``cpu``."""
    return os.environ.get(DEVICE_ENV, "cuda").strip() or "cuda"


def _device() -> torch.device:
    return torch.device(_device_name())


def _skip_reason() -> str | None:
    name = _device_name()
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
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

DRY_RUN = _device_name() == "cpu"
RECIPES = list(PRESETS)  # bf16, ufp4, e2m1_ref, nvfp4, mxfp4
U32 = 2.0 ** -24  # unit roundoff of fp32 (round to nearest)


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


# -- 1. the quantizer: same bits on the device as on the CPU --------------------------------------
# (format, options, shape): every entry of fp4/formats.py plus its option variants
FORMAT_CASES = [
    ("e2m1", {}, (64, 128)),
    ("int4", {}, (64, 128)),
    ("nvfp4", {}, (64, 128)),
    ("mxfp4", {}, (64, 128)),
    ("mxfp4", {"scale_mode": "rceil"}, (64, 128)),
    ("e2m1", {"max_level": 4}, (64, 128)),
    ("int4", {"block": 32}, (64, 128)),
    ("nvfp4", {"block_2d": True}, (64, 128)),
]
FORMAT_IDS = [f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for f, o, _ in FORMAT_CASES]


def _quantize_both(x, fmt, opts, rounding, axis=-1, rht=None, sr_index=None, key=None, fused=False):
    dev = _device()
    common = dict(axis=axis, rounding=rounding, rht=rht, sr_index=sr_index, sr_key=key, **opts)
    q_cpu = quantize(x, fmt, **common)
    q_dev = quantize(x.to(dev), fmt, **common)
    f_cpu = fake_quantize(x, fmt, **common)
    f_dev = fake_quantize(x.to(dev), fmt, fused=fused, **common)
    return q_cpu, q_dev, f_cpu, f_dev


def _assert_quantized_equal(q_cpu, q_dev, f_cpu, f_dev, what):
    assert q_dev.codes.device.type == _device().type
    assert_bits_equal(q_dev.codes, q_cpu.codes, f"{what}: codes")
    assert_bits_equal(q_dev.scales, q_cpu.scales, f"{what}: stored scales")
    assert_bits_equal(q_dev.decode_scales, q_cpu.decode_scales, f"{what}: decode scales")
    assert_bits_equal(q_dev.tensor_scale, q_cpu.tensor_scale, f"{what}: tensor scale")
    assert_bits_equal(q_dev.packed(), q_cpu.packed(), f"{what}: packed bytes")
    assert_bits_equal(q_dev.dequantize(rotated=True), q_cpu.dequantize(rotated=True), f"{what}: dequantized")
    assert_bits_equal(f_dev, f_cpu, f"{what}: fake_quantize")


@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("fmt,opts,shape", FORMAT_CASES, ids=FORMAT_IDS)
def test_quantizer_bits_match_cpu(fmt, opts, shape, rounding):
    x = sample_input(shape)
    key = 123456789 if rounding == "sr" else None
    _assert_quantized_equal(*_quantize_both(x, fmt, opts, rounding, key=key), f"{fmt} {opts} {rounding}")


@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_quantizer_sr_generator_axis0_and_shard_index_match_cpu(fmt):
    """SR keys drawn from a (CPU) generator seeded alike; axis 0; a shard offset whose global
    indices pass 2^31 (the second hash round)."""
    x = sample_input((128, 64), seed=1)
    dev = _device()
    for seed in (0, 7):
        g_cpu, g_dev = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        q_cpu = quantize(x, fmt, rounding="sr", generator=g_cpu)
        q_dev = quantize(x.to(dev), fmt, rounding="sr", generator=g_dev)
        assert_bits_equal(q_dev.codes, q_cpu.codes, f"{fmt} sr generator seed {seed}: codes")
        assert torch.equal(g_cpu.get_state(), g_dev.get_state())
    q = _quantize_both(x, fmt, {}, "sr", axis=0, key=99)
    _assert_quantized_equal(*q, f"{fmt} sr axis 0")
    wide = SRIndex(row_offset=2 ** 24, col_offset=32, row_stride=4096)  # last index > 2^31
    q = _quantize_both(x, fmt, {}, "sr", sr_index=wide, key=5)
    _assert_quantized_equal(*q, f"{fmt} sr wide shard index")


@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_quantizer_with_rht16_on_exact_inputs_matches_cpu(fmt, rounding):
    x = dyadic((64, 128), seed=2, exp=6)
    x[0, :32] = 0.0
    rht = RHT(16, seed=3)
    key = 4242 if rounding == "sr" else None
    _assert_quantized_equal(*_quantize_both(x, fmt, {}, rounding, rht=rht, key=key), f"{fmt} RHT16 {rounding}")
    dev = _device()
    assert_bits_equal(rht.rotate(x.to(dev)), rht.rotate(x), "RHT16 rotation of dyadic inputs")
    assert_bits_equal(rht.unrotate(rht.rotate(x.to(dev))), x, "RHT16 round trip of dyadic inputs")


@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("axis", [0, 1], ids=["groups-of-rows", "groups-along-K"])
@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_grouped_quantizer_matches_cpu(fmt, axis, rounding):
    """The grouped quantizer (MoE experts: G operands in one call, an empty group included) gives
    the CPU's bits on the device, without RHT on general inputs and with a size-16 RHT on exact ones."""
    sizes = (32, 0, 64, 32)
    shape = (sum(sizes), 64) if axis == 0 else (32, sum(sizes))
    seg = Segments(axis, sizes)
    keys = (11, None, 22, 33) if rounding == "sr" else None
    dev = _device()
    for x, rht in ((sample_input(shape, seed=8), None), (dyadic(shape, seed=9, exp=6), RHT(16, seed=1))):
        want = fake_quantize_grouped(x, fmt, seg, rounding, rht, keys=keys)
        got = fake_quantize_grouped(x.to(dev), fmt, seg, rounding, rht, keys=keys)
        assert_bits_equal(got, want, f"grouped {fmt} axis {axis} {rounding} rht {rht}")


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_rht_rotation_within_fp32_gemm_bound(size):
    """Any RHT size, general inputs: the rotation is a K = size GEMM; both devices are within
    gamma_K * |x| @ |R| of the float64 rotation (gemm_error_bound)."""
    x = sample_input((64, 256), seed=4)
    rht = RHT(size, seed=5)
    r64 = rht.matrix("cpu").double()  # the fp32 matrix both devices multiply by
    xb = x.reshape(-1, size)
    ref = (xb.double() @ r64).reshape(x.shape)
    bound = gemm_error_bound(xb, r64.T).reshape(x.shape)
    assert_within_bound(rht.rotate(x.to(_device())), ref, bound, f"RHT{size} on device")
    assert_within_bound(rht.rotate(x), ref, bound, f"RHT{size} on cpu")


@pytest.mark.skipif(DRY_RUN, reason="fused on the CPU compiles C++ (minutes); the CPU suite covers it")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the fused backend on CUDA needs triton")
@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_fused_quantizer_on_device_matches_eager_cpu(fmt, rounding):
    """gemm.backend=fused: torch.compile'd (Triton) quantizer, same bits as the eager CPU one."""
    x = sample_input((64, 128), seed=6)
    key = 777 if rounding == "sr" else None
    _, _, f_cpu, f_dev = _quantize_both(x, fmt, {}, rounding, key=key, fused=True)
    assert_bits_equal(f_dev, f_cpu, f"fused {fmt} {rounding}")


# -- 2. QuantizedLinear forward + backward -------------------------------------------------------
IN, OUT, BATCH, SEQ = 64, 32, 2, 16  # every dim a multiple of 32 (MXFP4 blocks, NVFP4 16x16 weights)


def _exact_rht_recipe(name: str) -> dict:
    """The preset, with a size-16 RHT where it uses a bigger one (see the module docstring)."""
    spec = {"name": name}
    if Recipe.preset(name).rht_size != 16:
        spec["rht_size"] = 16
    return spec


def _make_linear(spec, device, sr_seed=7, backend=REC, weights=None):
    m = QuantizedLinear(IN, OUT, bias=True, recipe=spec, sr_seed=sr_seed, backend=backend, device=device)
    if weights is not None:
        with torch.no_grad():
            m.weight.copy_(weights[0])
            m.bias.copy_(weights[1])
    return m


def _run_linear(m, x, dy, position):
    """One forward + backward; returns (outputs, recorded GEMM calls)."""
    rec = recorder()
    if position is None:
        m.step_context.at(None)  # outside training: SR keys come from the module's generator
    else:
        m.step_context.at(*position)  # in training: keys derived from (seed, step, micro-batch)
    xg = x.detach().to(m.weight.device, copy=True).requires_grad_(True)  # a fresh leaf per run
    m.zero_grad(set_to_none=True)
    y = m(xg)
    y.backward(dy.to(y.device))
    m.step_context.at(None)
    out = {"y": y.detach(), "dx": xg.grad, "dw": m.weight.grad, "db": m.bias.grad}
    return {k: v.detach().cpu() for k, v in out.items()}, rec.take()


def _check_outputs_against_operands(out, calls, x, dy, weight, bias, what):
    """Each GEMM output within the fp32 bound of a float64 GEMM of its own quantized operands."""
    if not calls:  # high precision (F.linear): the operands are the inputs themselves
        x2, dy2 = x.reshape(-1, IN), dy.reshape(-1, OUT)
        calls = [{"a": x2, "b": weight}, {"a": dy2, "b": weight.T}, {"a": dy2.T, "b": x2.T}]
    fprop, dgrad, wgrad = calls
    ref = fprop["a"].double() @ fprop["b"].double().T + bias.double()
    # the bias is one more term of the same sum: gamma_(K+1) * (|A| @ |B|^T + |bias|)
    k1 = fprop["a"].shape[-1] + 1
    bound = (k1 * U32 / (1 - k1 * U32)) * (fprop["a"].double().abs() @ fprop["b"].double().abs().T
                                           + bias.double().abs()) + k1 * 2.0 ** -149
    assert_within_bound(out["y"].reshape(-1, OUT), ref, bound, f"{what}: fprop y")
    assert_within_bound(out["dx"].reshape(-1, IN), dgrad["a"].double() @ dgrad["b"].double().T,
                        gemm_error_bound(dgrad["a"], dgrad["b"]), f"{what}: dgrad dx")
    assert_within_bound(out["dw"], wgrad["a"].double() @ wgrad["b"].double().T,
                        gemm_error_bound(wgrad["a"], wgrad["b"]), f"{what}: wgrad dw")
    dy2 = dy.reshape(-1, OUT).double()
    t = dy2.shape[0]
    assert_within_bound(out["db"], dy2.sum(0), (t * U32 / (1 - t * U32)) * dy2.abs().sum(0) + t * 2.0 ** -149,
                        f"{what}: bias grad")


@pytest.mark.parametrize("position", [None, (5, 1)], ids=["generator-keys", "step-keys"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_quantized_linear_matches_cpu(recipe, position):
    """Forward + backward of one linear on the device and on the CPU, same weights, inputs and SR
    keys: every quantized GEMM operand bitwise equal, every output within the fp32 GEMM bound of
    the float64 product of its operands (on both devices)."""
    spec = _exact_rht_recipe(recipe)
    weights = (dyadic((OUT, IN), 10, 7), dyadic((OUT,), 11, 7))
    x, dy = dyadic((BATCH, SEQ, IN), 12, 6), dyadic((BATCH, SEQ, OUT), 13, 8)
    cpu = _make_linear(spec, "cpu", weights=weights)
    dev = _make_linear(spec, _device())  # the same sr_seed: step keys derive from it (the factory's in training)
    dev.load_state_dict(cpu.state_dict())  # weights, SR generator state and RHT signs
    assert dev.weight.device.type == _device().type

    out_cpu, calls_cpu = _run_linear(cpu, x, dy, position)
    out_dev, calls_dev = _run_linear(dev, x, dy, position)
    quantized = Recipe.from_dict(spec).quantized
    assert len(calls_dev) == len(calls_cpu) == (3 if quantized else 0)
    for gemm, c_dev, c_cpu in zip(("fprop", "dgrad", "wgrad"), calls_dev, calls_cpu):
        assert c_dev["keys"] == c_cpu["keys"], f"{recipe} {gemm}: SR keys differ"
        assert_bits_equal(c_dev["a"], c_cpu["a"], f"{recipe} {gemm}: quantized A")
        assert_bits_equal(c_dev["b"], c_cpu["b"], f"{recipe} {gemm}: quantized B")
    w, b = weights
    _check_outputs_against_operands(out_dev, calls_dev, x, dy, w, b, f"{recipe} on {_device()}")
    _check_outputs_against_operands(out_cpu, calls_cpu, x, dy, w, b, f"{recipe} on cpu")
    assert torch.equal(cpu.gemms.generator.get_state(), dev.gemms.generator.get_state())


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantized_linear_presets_on_general_inputs(recipe):
    """The presets exactly as shipped (MXFP4 with its size-32 RHT), Gaussian inputs: outputs on
    the device within the fp32 bound of its own operands; operands equal to the CPU's up to
    the RHT's rounding (a few ulps of the scale, and rare elements that sit on a rounding
    boundary and round the other way)."""
    spec = {"name": recipe}
    g = torch.Generator().manual_seed(20)
    weights = (torch.randn(OUT, IN, generator=g) * 0.1, torch.randn(OUT, generator=g) * 0.1)
    x, dy = torch.randn(BATCH, SEQ, IN, generator=g), torch.randn(BATCH, SEQ, OUT, generator=g) * 1e-3
    cpu = _make_linear(spec, "cpu", weights=weights)
    dev = _make_linear(spec, _device())
    dev.load_state_dict(cpu.state_dict())
    out_cpu, calls_cpu = _run_linear(cpu, x, dy, (3, 0))
    out_dev, calls_dev = _run_linear(dev, x, dy, (3, 0))
    w, b = weights
    _check_outputs_against_operands(out_dev, calls_dev, x, dy, w, b, f"{recipe} on {_device()}")
    _check_outputs_against_operands(out_cpu, calls_cpu, x, dy, w, b, f"{recipe} on cpu")
    for gemm, c_dev, c_cpu in zip(("fprop", "dgrad", "wgrad"), calls_dev, calls_cpu):
        for side in ("a", "b"):
            got, want = c_dev[side].double(), c_cpu[side].double()
            diff = (got - want).abs()
            ulps = diff <= 2.0 ** -14 * torch.maximum(got.abs(), want.abs())  # see the rotation bound above
            assert float((~ulps).double().mean()) <= 0.01, f"{recipe} {gemm} {side}: {int((~ulps).sum())} flips"
            assert float(diff.max()) <= 0.5 * float(want.abs().max()), f"{recipe} {gemm} {side}"


def _grouped_reference(call: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 per-group products of a recorded grouped GEMM and their fp32 bound (layouts as
    ``linear.backends.grouped_mm``: B (G, N, K) with A's rows in groups, or A and B in K groups)."""
    a, b, sizes = call["a"], call["b"], call["sizes"]
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    if b.dim() == 3:
        refs = [a[s:s + n].double() @ b[g].double().T for g, (s, n) in enumerate(zip(starts, sizes))]
        bounds = [gemm_error_bound(a[s:s + n], b[g]) for g, (s, n) in enumerate(zip(starts, sizes))]
        return torch.cat(refs), torch.cat(bounds)
    refs = [a[:, s:s + n].double() @ b[:, s:s + n].double().T for s, n in zip(starts, sizes)]
    bounds = [gemm_error_bound(a[:, s:s + n], b[:, s:s + n]) for s, n in zip(starts, sizes)]
    return torch.stack(refs), torch.stack(bounds)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if Recipe.preset(r).quantized])
def test_grouped_expert_linears_match_cpu(recipe):
    """MoE experts as grouped GEMMs (``grouped_linear``: torch._grouped_mm where it runs), one
    expert without tokens: quantized operands and SR keys bitwise the CPU's, outputs within the
    fp32 bound of float64 per-expert products of the operands, on both devices."""
    from megatron_ufp4.linear.grouped import grouped_linear

    spec, sizes = _exact_rht_recipe(recipe), (16, 0, 32)
    weights = [dyadic((OUT, IN), 70 + e, 7) for e in range(len(sizes))]
    x, dy = dyadic((sum(sizes), IN), 80, 6), dyadic((sum(sizes), OUT), 81, 8)

    def run(device):
        lins = [QuantizedLinear(IN, OUT, bias=False, recipe=spec, sr_seed=200 + e, backend=REC, device=device)
                for e in range(len(sizes))]
        with torch.no_grad():
            for lin, w in zip(lins, weights):
                lin.weight.copy_(w)
        rec = recorder()
        lins[0].step_context.at(4, 1)
        xg = x.detach().to(device, copy=True).requires_grad_(True)
        y = grouped_linear(lins, xg, sizes)
        y.backward(dy.to(device))
        out = {"y": y.detach().cpu(), "dx": xg.grad.cpu(), "dw": [None if lin.weight.grad is None else
                                                                 lin.weight.grad.cpu() for lin in lins]}
        return out, rec.take()

    out_cpu, calls_cpu = run("cpu")
    out_dev, calls_dev = run(_device())
    assert len(calls_cpu) == len(calls_dev) == 3
    for gemm, c_dev, c_cpu in zip(("fprop", "dgrad", "wgrad"), calls_dev, calls_cpu):
        assert c_dev["keys"] == c_cpu["keys"] and c_dev["sizes"] == c_cpu["sizes"], f"{recipe} {gemm}"
        assert_bits_equal(c_dev["a"], c_cpu["a"], f"{recipe} grouped {gemm}: quantized A")
        assert_bits_equal(c_dev["b"], c_cpu["b"], f"{recipe} grouped {gemm}: quantized B")
    for where, out, calls in ((_device(), out_dev, calls_dev), ("cpu", out_cpu, calls_cpu)):
        (y_ref, y_bound), (dx_ref, dx_bound), (dw_ref, dw_bound) = (_grouped_reference(c) for c in calls)
        assert_within_bound(out["y"], y_ref, y_bound, f"{recipe} grouped fprop on {where}")
        assert_within_bound(out["dx"], dx_ref, dx_bound, f"{recipe} grouped dgrad on {where}")
        assert out["dw"][1] is None  # the expert without tokens
        for e in (0, 2):
            assert_within_bound(out["dw"][e], dw_ref[e], dw_bound[e], f"{recipe} grouped wgrad expert {e} on {where}")


# -- 3. SR state in checkpoints: device-independent ---------------------------------------------
def _save_load(module, device) -> dict:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, map_location=device, weights_only=True)


@pytest.mark.parametrize("direction", ["device_to_cpu", "cpu_to_device"])
@pytest.mark.parametrize("recipe", ["ufp4", "nvfp4", "mxfp4"])
def test_sr_state_checkpoint_round_trip_across_devices(recipe, direction):
    """A QuantizedLinear's state dict (weights, SR generator, RHT signs) saved on one device loads
    into a fresh module on the other (and into a fresh one on the same device), and all three
    continue with identical SR keys and bitwise equal quantized operands."""
    spec = _exact_rht_recipe(recipe)
    src_dev, dst_dev = (_device(), torch.device("cpu")) if direction == "device_to_cpu" else \
        (torch.device("cpu"), _device())
    weights = (dyadic((OUT, IN), 30, 7), dyadic((OUT,), 31, 7))
    src = _make_linear(spec, src_dev, sr_seed=3, weights=weights)
    for i in range(2):  # advance the generator (keys drawn outside training)
        _run_linear(src, dyadic((BATCH, SEQ, IN), 40 + i, 6), dyadic((BATCH, SEQ, OUT), 50 + i, 8), None)
    state = src.state_dict()
    extra = state["_extra_state"]
    assert extra["sr_generator"].device.type == "cpu" and extra["sr_generator"].dtype == torch.uint8

    other = _make_linear(spec, dst_dev, sr_seed=1000)  # other seed: only the load makes the states agree
    other.load_state_dict(_save_load(src, dst_dev))
    same = _make_linear(spec, src_dev, sr_seed=1000)
    same.load_state_dict(_save_load(src, src_dev))
    assert other.weight.device.type == dst_dev.type
    for m in (other, same):
        assert torch.equal(m.gemms.generator.get_state(), src.gemms.generator.get_state())
        assert torch.equal(m.gemms.rht.signs, src.gemms.rht.signs)

    x, dy = dyadic((BATCH, SEQ, IN), 60, 6), dyadic((BATCH, SEQ, OUT), 61, 8)
    runs = {name: _run_linear(m, x, dy, None) for name, m in (("src", src), ("same", same), ("other", other))}
    assert len(runs["src"][1]) == 3
    for name in ("same", "other"):
        for gemm, c, c_src in zip(("fprop", "dgrad", "wgrad"), runs[name][1], runs["src"][1]):
            assert c["keys"] == c_src["keys"], f"{name} {gemm}: SR keys differ after the round trip"
            assert any(k is not None for k in c["keys"]) or gemm == "fprop"
            assert_bits_equal(c["a"], c_src["a"], f"{name} ({direction}) {gemm}: quantized A")
            assert_bits_equal(c["b"], c_src["b"], f"{name} ({direction}) {gemm}: quantized B")
    assert_bits_equal(runs["same"][0]["y"], runs["src"][0]["y"], "same-device continuation y")
    for m in (other, same):
        assert torch.equal(m.gemms.generator.get_state(), src.gemms.generator.get_state())


# -- 4. training on the device ------------------------------------------------------------------
@pytest.fixture
def deterministic():
    """Deterministic kernels where torch has them (SDPA backward, index_add_); warn_only so an
    op without one warns instead of failing, and a remaining difference shows in the losses."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


RESUME = ["recipe.name=ufp4", "training.train_steps=4", "training.eval_interval=2", "checkpoint.interval=0",
          "optimizer.lr=3e-3", "schedule.warmup_steps=1"]
EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "skipped", "skipped_total", "val_loss", "val_ppl", "moe")


@pytest.mark.parametrize("config", ["tiny_dense", "tiny_moe"])
def test_exact_resume_on_device(config, tiny_cfg, tmp_path, deterministic):
    """4 steps uninterrupted == 2 steps + checkpoint + resume for 2, bit for bit (UFP4, SR on dY)."""
    from megatron_ufp4.training.trainer import Trainer

    dev = f"training.device={_device_name()}"
    ref = Trainer(tiny_cfg(config, tmp_path / "ref", *RESUME, dev), console=quiet)
    assert next(ref.model.parameters()).device.type == _device().type
    ref_result = ref.train()
    ref_model = snapshot(ref.model.state_dict())
    ref.close()

    first = Trainer(tiny_cfg(config, tmp_path / "resumed", *RESUME, dev), console=quiet)
    assert first.train(exit_after=2)["step"] == 2
    first.close()
    del first
    logs: list[str] = []
    second = Trainer(tiny_cfg(config, tmp_path / "resumed", *RESUME, dev), console=logs.append)
    assert second.step == 2 and any("resumed" in line for line in logs)
    result = second.train()
    second.close()

    want, got = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert len({r["loss"] for r in want}) == 4  # the model really changes from step to step
    for g, w in zip(got, want):
        assert {k: g.get(k) for k in EXACT_KEYS} == {k: w.get(k) for k in EXACT_KEYS}, f"step {w['step']}"
    assert {k: result.get(k) for k in EXACT_KEYS} == {k: ref_result.get(k) for k in EXACT_KEYS}
    assert_state_equal(snapshot(second.model.state_dict()), ref_model, "model")


@pytest.mark.parametrize("recipe,dtype", [("bf16", "fp32"), ("ufp4", "fp32"), ("ufp4", "bf16")])
@pytest.mark.parametrize("config", ["tiny_dense", "tiny_moe"])
def test_training_on_device_lowers_the_loss(config, recipe, dtype, tiny_cfg, tmp_path):
    from megatron_ufp4.training.trainer import Trainer

    steps = 30
    cfg = tiny_cfg(config, tmp_path, f"recipe.name={recipe}", f"training.dtype={dtype}",
                   f"training.train_steps={steps}", f"training.device={_device_name()}", "optimizer.lr=3e-3",
                   "schedule.kind=cosine", "schedule.warmup_steps=4", "training.eval_interval=0",
                   "checkpoint.interval=0", "checkpoint.save_final=false")
    trainer = Trainer(cfg, console=quiet)
    assert trainer.device.type == _device().type
    assert all(p.device.type == _device().type for p in trainer.model.parameters())
    records = [trainer.train_step() for _ in range(steps)]
    trainer.close()
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses) and not any(r["skipped"] for r in records), losses
    assert losses[0] == pytest.approx(math.log(512), abs=0.3), losses[0]  # uniform over the vocabulary
    last = sum(losses[-5:]) / 5
    assert last < losses[0] - 0.5, (losses[0], last)
