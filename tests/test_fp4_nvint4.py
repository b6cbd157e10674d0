"""nvint4: the uniform grid (integer magnitudes 0..7) with NVFP4's two-level scales, and the
``ufp4_nv`` recipe.  References: hand-computed blocks, the step-by-step fp32 reference of
tests/fp4_reference.py (``nvfp4_ref`` on the 0..7 grid), and float64 statistics.  Element
codes and packed bytes (sign-magnitude, -0 as code 8) are checked against the hardware-style
converter in test_fp4_codes.py; the Triton kernels' bits in test_triton_backend.py."""
import numpy as np
import pytest
import torch

from megatron_ufp4.fp4 import fake_quantize, get_grid, quantize
from megatron_ufp4.fp4.formats import FORMATS
from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.linear import QuantizedLinear
from megatron_ufp4.linear.native_backend import native_format_problem
from fp4_reference import INT4_LEVELS, nvfp4_ref

pytestmark = pytest.mark.numerical

F32 = np.float32


def _check(x, tensor_amax=None):
    """quantize(x, 'nvint4') against the fp32 reference, bit for bit; returns (q, reference)."""
    ref = nvfp4_ref([r.tolist() for r in x.reshape(-1, 16)], tensor_amax, levels=INT4_LEVELS)
    s_enc, s_dec, g_dec, dec, deq = ref
    q = quantize(x, "nvint4", **({} if tensor_amax is None else {"tensor_amax": torch.tensor(tensor_amax)}))
    assert q.scales.dtype == torch.float8_e4m3fn
    assert q.tensor_scale.item() == g_dec
    assert q.scales.float().flatten().tolist() == s_dec
    assert q.decode_scales.flatten().tolist() == dec
    assert q.dequantize().reshape(-1, 16).tolist() == deq
    return q, ref


def test_format_is_the_uniform_grid_with_e4m3_block_and_fp32_tensor_scales():
    fmt = FORMATS["nvint4"]
    assert (fmt.grid, fmt.scale, fmt.block) == ("int4", "e4m3", 16)
    assert get_grid("int4").levels == INT4_LEVELS and get_grid("int4").max == 7.0


def test_hand_computed_blocks():
    # tensor amax 14: S_enc = 448 * 7 / 14 = 224 exactly; block multiplier 224 * f32(1/7) rounds
    # to 32 exactly (the product is 32 + 1.4e-6, under half an ulp of 32)
    x = torch.zeros(2, 16)
    x[0, :5] = torch.tensor([7.0, -1.5, 2.5, 0.4, -7.0])
    x[1, :5] = torch.tensor([14.0, 5.0, -3.0, 0.9, 1.1])
    q, (s_enc, s_dec, g_dec, dec, _) = _check(x)
    assert s_enc == 224.0 and g_dec == float(F32(1) / F32(224))
    # block 0: 7 * 32 = 224 (e4m3 1.75 * 2^7); block 1: 14 * 32 = 448 (e4m3 max)
    assert s_dec == [224.0, 448.0]
    assert dec == [1.0, 2.0]  # 224 / 224, 448 / 224
    # block 0 on the integers: 7, -1.5 -> -2 (tie to the even code), 2.5 -> 2 (tie to even), 0.4 -> 0
    # block 1 in steps of 2: 14, 5 -> 2.5 -> 2 -> 4, -3 -> -1.5 -> -2 -> -4, 0.9 -> 0, 1.1 -> 0.55 -> 1 -> 2
    got = q.dequantize()
    assert got[0, :5].tolist() == [7.0, -2.0, 2.0, 0.0, -7.0]
    assert got[1, :5].tolist() == [14.0, 4.0, -4.0, 0.0, 2.0]
    codes = q.codes.reshape(2, 16)
    assert codes[0, :5].tolist() == [7, 8 | 2, 2, 0, 8 | 7]  # sign bit 3, magnitude bits 0-2
    assert codes[1, :5].tolist() == [7, 2, 8 | 2, 0, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tensors_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    _check(torch.randn(4, 64, generator=g) * torch.logspace(-3, 3, 4)[:, None])


@pytest.mark.parametrize("tensor_amax", [40.0, 7.0, 1e-3])
def test_given_tensor_amax_matches_reference(tensor_amax):
    """A tensor-parallel shard quantizes with the all-reduced amax, not its own."""
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    _check(x, tensor_amax)


def test_e4m3_rounding_down_saturates_at_code_7():
    """When E4M3 rounds a block scale down, the block's largest scaled element exceeds 7 and
    saturates (the price of 8-bit scales; NVFP4 has the same at 6)."""
    x = torch.zeros(2, 16)
    x[0, 0] = 100.0  # sets the tensor amax: S_enc = 31.36
    x[1, 0], x[1, 1] = 9.3, -9.3  # 9.3 * 31.36 / 7 = 41.66 -> e4m3 40 (step 4 above 32): rounded down
    q, (_, s_dec, _, dec, deq) = _check(x)
    assert s_dec[1] == 40.0
    top = float(F32(7) * F32(dec[1]))  # the fp32 product the dequantization forms
    assert 9.3 / dec[1] > 7.0 and deq[1][:2] == [top, -top]
    assert q.codes.reshape(2, 16)[1, :2].tolist() == [7, 15]
    # under SR too: a value above the grid has no upper neighbour, so every draw gives +-7 and
    # the expectation is pulled toward zero (the bias E4M3 scales add to SR; FP32 scales have none)
    xs = x.repeat(64, 1)
    sr = quantize(xs, "nvint4", rounding="sr", generator=torch.Generator().manual_seed(3),
                  tensor_amax=torch.tensor(100.0))
    assert (sr.codes.reshape(128, 16)[1::2, :2] == torch.tensor([7, 15])).all()


def test_all_sixteen_codes_decode_to_signed_integers():
    lut = get_grid("int4").signed_lut("cpu")
    assert lut.tolist() == [0.0, 1, 2, 3, 4, 5, 6, 7, -0.0, -1, -2, -3, -4, -5, -6, -7]
    assert torch.signbit(lut[8])  # code 8 is -0


def test_zero_tensor_and_zero_block():
    x = torch.zeros(2, 16)
    q, _ = _check(x)  # amax 0: S_enc = 1, every scale 0, every value 0
    assert q.dequantize().abs().sum() == 0
    x[1, 3] = -2.0
    _check(x)  # a zero block beside a nonzero one keeps scale 0


def test_stochastic_rounding_is_unbiased():
    """E[SR(x)] = x inside the range.  Mean of n draws of one element: its variance is at most
    step^2 / 4 per draw (Bernoulli between two neighbours one step apart), so the mean's
    standard error is <= step / (2 sqrt(n)); 5 of them bound the error with probability
    1 - 6e-7 per element.  The draws are counter-based, so the seed makes this deterministic."""
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(5)) * 3
    n = 4096
    xs = x.expand(n, 16).contiguous()
    got = fake_quantize(xs, "nvint4", rounding="sr", tensor_amax=x.abs().max(),
                        generator=torch.Generator().manual_seed(7)).double().mean(0)
    step = quantize(x, "nvint4").decode_scales.item()
    assert (got - x[0].double()).abs().max() <= 5 * step / (2 * n ** 0.5)


def test_ufp4_nv_recipe_is_ufp4s_scopes_on_nvint4():
    r, u = Recipe.preset("ufp4_nv"), Recipe.preset("ufp4")
    for gemm in ("fprop", "dgrad", "wgrad"):
        g, gu = r.gemm(gemm), u.gemm(gemm)
        assert g.rht == gu.rht is True
        for role in ("a", "b"):
            op, opu = getattr(g, role), getattr(gu, role)
            assert op.fmt == FORMATS["nvint4"] and op.rounding == opu.rounding
    assert r.gemm("dgrad").a.rounding == "sr" and r.gemm("fprop").a.rounding == "rtne"
    assert r.label() == "ufp4_nv"
    assert native_format_problem(FORMATS["nvint4"]) is not None  # no FP4 tensor-core path claimed


def test_quantized_linear_runs_ufp4_nv_and_differs_from_ufp4_only_by_the_scales():
    """Same layer, same SR draws: ufp4_nv's output is near ufp4's (both uniform grids), not equal
    (E4M3 block scales round, and saturate the rounded-down blocks)."""
    torch.manual_seed(0)
    a = QuantizedLinear(64, 32, False, "ufp4", sr_seed=3)
    b = QuantizedLinear(64, 32, False, "ufp4_nv", sr_seed=3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 64)
    ya, yb, ref = a(x), b(x), x @ a.weight.t()
    assert not torch.equal(ya, yb)
    # both are a few-percent FP4 error away from the exact product, and about as far
    err_a, err_b = (ya - ref).norm() / ref.norm(), (yb - ref).norm() / ref.norm()
    assert err_b < 2 * err_a and err_a < 2 * err_b
