"""Block scales (arXiv 2606.20381): NVFP4 (TE arithmetic), 2D weight blocks, MXFP4 E8M0, plain FP32."""
import math

import numpy as np
import pytest
import torch

from megatron_ufp4.fp4 import quantize
from fp4_reference import E2M1_LEVELS, INT4_LEVELS, levels_for, nvfp4_ref, rtne_ref

pytestmark = pytest.mark.numerical

F32 = np.float32

# ---------------------------------------------------------------------------------------------
# NVFP4: S_enc = 448*6/amax_t; S_dec_b = e4m3(min(amax_b * (S_enc * (1/6)), 448)); enc = 1/(S_dec_b * (1/S_enc))
# ---------------------------------------------------------------------------------------------


def _check_nvfp4(x, tensor_amax=None):
    """Compare quantize(x, 'nvfp4') with the step-by-step fp32 reference, bit for bit."""
    rows = x.reshape(-1, 16)
    s_enc, s_dec, g_dec, dec, deq = nvfp4_ref([r.tolist() for r in rows], tensor_amax)
    kw = {} if tensor_amax is None else {"tensor_amax": torch.tensor(tensor_amax)}
    q = quantize(x, "nvfp4", **kw)
    assert q.scales.dtype == torch.float8_e4m3fn
    assert q.tensor_scale.item() == g_dec
    assert q.scales.float().flatten().tolist() == s_dec
    assert q.decode_scales.flatten().tolist() == dec
    got = q.dequantize()
    assert bool(torch.isfinite(got).all())
    assert got.reshape(-1, 16).tolist() == deq
    return q, s_enc, s_dec, g_dec


def test_nvfp4_normal_case_hand_values():
    # two blocks, amax 3 and 12: S_enc = 2688/12 = 224 exactly
    x = torch.zeros(2, 16)
    x[0, :4] = torch.tensor([3.0, -1.0, 0.4, 2.2])
    x[1, :4] = torch.tensor([-12.0, 5.0, 7.0, 0.3])
    q, s_enc, s_dec, g_dec = _check_nvfp4(x)
    assert s_enc == 224.0
    # S_enc * (1/6) = 37.333..; 3 * that = 112 (e4m3 1.75*2^6), 12 * that = 448 (e4m3 max)
    assert s_dec == [112.0, 448.0]
    assert g_dec == float(F32(1) / F32(224))
    # block 0 decodes with ~0.5, block 1 with ~2: 3 -> 6, -1 -> -2, 0.4 -> 0.8 -> 1 (x0.5 = 0.5), ...
    got = q.dequantize()
    assert got[0, :4].tolist() == pytest.approx([3.0, -1.0, 0.5, 2.0], rel=1e-6)
    assert got[1, :4].tolist() == pytest.approx([-12.0, 4.0, 8.0, 0.0], rel=1e-6, abs=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nvfp4_random_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 64, generator=g) * torch.logspace(-2, 2, 4)[:, None]
    _check_nvfp4(x)


@pytest.mark.parametrize("amax", [5.0, 6.0, 7.0, 11.0, 0.7, 1e-3, 3e38])
def test_nvfp4_tensor_encode_scale_is_a_true_fp32_division(amax):
    # TE: S_enc = 448*6 / amax_t, one correctly rounded fp32 division (not 2688 * (1/amax_t),
    # which rounds twice and is off by an ulp for e.g. amax_t = 5, 7, 11)
    x = torch.zeros(1, 16)
    x[0, 0] = amax
    s_enc = F32(2688.0) / F32(amax)
    q = quantize(x, "nvfp4")
    assert q.tensor_scale.item() == float(F32(1.0) / s_enc)
    q2 = quantize(torch.ones(1, 16), "nvfp4", tensor_amax=torch.tensor(amax))
    assert q2.tensor_scale.item() == float(F32(1.0) / s_enc)


def test_nvfp4_zero_block_beside_nonzero_block():
    x = torch.zeros(1, 32)
    x[0, 16:] = torch.linspace(-2, 6, 16)
    q, _, s_dec, _ = _check_nvfp4(x)
    assert s_dec[0] == 0.0 and q.scales.float()[0, 0].item() == 0.0
    assert q.decode_scales.flatten()[0].item() == 0.0
    assert torch.equal(q.dequantize()[0, :16], torch.zeros(16))


def test_nvfp4_underflowing_block_gets_scale_zero():
    # S_enc = 2688/1e4; tiny block: 1e-6 * 0.2688 / 6 ~ 4.5e-8, far below e4m3's smallest subnormal 2^-9
    x = torch.zeros(1, 32)
    x[0, :16] = 1e-6
    x[0, 3] = -1e-6
    x[0, 16] = 1e4
    x[0, 17] = -3.3e3
    q, _, s_dec, _ = _check_nvfp4(x)
    assert s_dec[0] == 0.0
    out = q.dequantize()
    assert torch.equal(out[0, :16], torch.zeros(16))
    assert not bool(out.isnan().any())


def test_nvfp4_all_zero_tensor():
    x = torch.zeros(2, 32)
    q, s_enc, s_dec, g_dec = _check_nvfp4(x)
    assert s_enc == 1.0 and g_dec == 1.0
    assert q.tensor_scale.item() == 1.0
    assert s_dec == [0.0] * 4
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("big", [1e30, 3e38])
def test_nvfp4_huge_amax_stays_finite(big):
    x = torch.linspace(-1, 1, 32).reshape(1, 32) * big
    q = quantize(x, "nvfp4")
    s_enc = 2688.0 / float(F32(big))
    assert q.tensor_scale.item() == pytest.approx(1 / s_enc, rel=1e-6)
    assert q.scales.float().flatten().tolist() == [448.0, 448.0]
    for t in (q.tensor_scale, q.decode_scales, q.dequantize()):
        assert bool(torch.isfinite(t).all())
    out = q.dequantize()
    assert out.abs().max().item() == pytest.approx(big, rel=1e-6)
    assert out[0, 0].item() < 0 < out[0, -1].item()
    # every element within half the largest E2M1 gap (1 scaled unit) of x
    assert bool(((out.double() - x.double()).abs() <= q.decode_scales.double().max() * (1 + 1e-6)).all())


@pytest.mark.parametrize("big", [1e30])
def test_nvfp4_huge_amax_matches_reference(big):
    _check_nvfp4(torch.linspace(-1, 1, 32).reshape(1, 32) * big)


@pytest.mark.parametrize("tensor_amax", [24.0, 12.0, 6.0, 1e-3])
def test_nvfp4_explicit_tensor_amax(tensor_amax):
    # e.g. an amax all-reduced across tensor-parallel ranks; smaller than the local amax saturates
    x = torch.zeros(2, 16)
    x[0, :4] = torch.tensor([3.0, -1.0, 0.4, 2.2])
    x[1, :4] = torch.tensor([-12.0, 5.0, 7.0, 0.3])
    q, s_enc, _, g_dec = _check_nvfp4(x, tensor_amax)
    assert s_enc == float(F32(2688.0) / F32(tensor_amax))


def test_nvfp4_explicit_tensor_amax_changes_result():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    a = quantize(x, "nvfp4").tensor_scale.item()
    b = quantize(x, "nvfp4", tensor_amax=x.abs().max() * 7).tensor_scale.item()
    assert b == pytest.approx(7 * a, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# NVFP4 2D 16x16 weight blocks
# ---------------------------------------------------------------------------------------------


def test_nvfp4_2d_blocks_transpose_invariant():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    w[3, 40] = 9.0  # an outlier: its whole 16x16 tile shares the scale
    a = quantize(w, "nvfp4", block_2d=True)
    b = quantize(w.T.contiguous(), "nvfp4", block_2d=True, axis=-1)
    assert torch.equal(a.dequantize(), b.dequantize().T)
    assert a.scales.shape == (2, 3) and b.scales.shape == (3, 2)
    assert torch.equal(a.scales.float(), b.scales.float().T)
    c = quantize(w, "nvfp4", block_2d=True, axis=0)
    assert torch.equal(a.dequantize(), c.dequantize())
    # 1x16 blocks do not have this property (keeps the assertion above meaningful)
    d1 = quantize(w, "nvfp4").dequantize()
    d2 = quantize(w.T.contiguous(), "nvfp4").dequantize().T
    assert not torch.equal(d1, d2)


def test_nvfp4_2d_blocks_match_reference():
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(2))
    w[20, 5] = -12.0  # tensor amax 12: S_enc = 224 exactly
    tiles = [w[r:r + 16, c:c + 16].flatten().tolist() for r in (0, 16) for c in (0, 16)]
    _, s_dec, _, dec, deq = nvfp4_ref(tiles)
    q = quantize(w, "nvfp4", block_2d=True)
    assert q.scales.float().flatten().tolist() == s_dec
    got = q.dequantize()
    got_tiles = [got[r:r + 16, c:c + 16].flatten().tolist() for r in (0, 16) for c in (0, 16)]
    assert got_tiles == deq


# ---------------------------------------------------------------------------------------------
# MXFP4 E8M0 power-of-two scales
# ---------------------------------------------------------------------------------------------

# amax -> expected scale exponent, worked out by hand
FLOOR_CASES = [  # 2^(floor(log2 amax) - 2)
    (6.0, 0), (4.0, 0), (7.99, 0), (8.0, 1), (1.0, -2), (0.75, -3), (1024.0, 8), (1000.0, 7),
    (3e-5, -18), (2.0 ** -100, -102), (0.0, -127),
]
RCEIL_CASES = [  # 2^ceil(log2(amax / 6))
    (6.0, 0), (12.0, 1), (4.0, 0), (7.0, 1), (8.0, 1), (24.0, 2), (3.0, -1), (0.75, -3),
    (1024.0, 8), (6.0 * 2 ** -20, -20), (6.0 * 2 ** -20 * 1.01, -19), (0.0, -127),
]


def _mx_block(amax):
    x = torch.zeros(2, 32)
    x[0, 7] = -amax
    x[0, 9] = amax / 3
    x[1, 0] = 6.0  # a second block with a unit scale
    return x


@pytest.mark.parametrize("amax,exp", FLOOR_CASES)
def test_mxfp4_floor_scale(amax, exp):
    if amax > 0:  # the hand value agrees with the float64 formula
        assert exp == math.floor(math.log2(amax)) - 2
    q = quantize(_mx_block(amax), "mxfp4")
    assert q.scales.dtype == torch.float8_e8m0fnu
    assert q.scales.shape == (2, 1)
    assert q.scales.view(torch.uint8).flatten().tolist() == [exp + 127, 127]
    assert q.decode_scales.flatten().tolist() == [2.0 ** exp, 1.0]
    assert q.tensor_scale is None


@pytest.mark.parametrize("amax,exp", RCEIL_CASES)
def test_mxfp4_rceil_scale(amax, exp):
    if amax > 0:
        assert exp == math.ceil(math.log2(amax / 6))
    q = quantize(_mx_block(amax), "mxfp4", scale_mode="rceil")
    assert q.scales.dtype == torch.float8_e8m0fnu
    assert q.scales.view(torch.uint8).flatten().tolist() == [exp + 127, 127]
    assert q.decode_scales.flatten().tolist() == [2.0 ** exp, 1.0]
    if amax > 0:  # rceil never saturates: amax / scale <= 6
        assert amax / 2.0 ** exp <= 6.0


@pytest.mark.parametrize("mode", ["floor", "rceil"])
def test_mxfp4_elements_match_reference(mode):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, generator=g) * torch.tensor([1e-3, 1.0, 37.0, 1e4])[:, None]
    q = quantize(x, "mxfp4", scale_mode=mode)
    out = q.dequantize()
    for r in range(4):
        for b in range(2):
            blk = x[r, 32 * b:32 * (b + 1)].double()
            amax = blk.abs().max().item()
            e = (math.floor(math.log2(amax)) - 2) if mode == "floor" else math.ceil(math.log2(amax / 6))
            s = 2.0 ** e  # power of two: x / s and q * s are exact
            exp_vals = [rtne_ref(v / s, E2M1_LEVELS) * s for v in blk.tolist()]
            assert out[r, 32 * b:32 * (b + 1)].tolist() == exp_vals


# ---------------------------------------------------------------------------------------------
# plain FP32 scales (the paper's recipes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,levels,kw", [
    ("e2m1", E2M1_LEVELS, {}), ("int4", INT4_LEVELS, {}),
    ("e2m1", levels_for("e2m1", 4), {"max_level": 4}), ("e2m1", levels_for("e2m1", 2), {"max_level": 2}),
])
def test_fp32_scale_is_amax_over_gmax(fmt, levels, kw):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 48, generator=g) * torch.tensor([1e-20, 1.0, 3e5])[:, None]
    x[1, 16:32] = 0.0  # an all-zero block: scale 0, dequantizes to 0
    q = quantize(x, fmt, **kw)
    gmax = levels[-1]
    assert q.scales.dtype == torch.float32 and q.scales.shape == (3, 3)
    assert q.tensor_scale is None
    out = q.dequantize()
    for r in range(3):
        for b in range(3):
            blk = x[r, 16 * b:16 * (b + 1)].double().tolist()
            amax = max(abs(v) for v in blk)
            # float64 quotient rounded once to fp32 == the correctly rounded fp32 division
            s = float(F32(amax / gmax))
            assert q.scales[r, b].item() == s
            if s == 0:
                assert out[r, 16 * b:16 * (b + 1)].tolist() == [0.0] * 16
                continue
            exp_vals = [float(F32(rtne_ref(float(F32(v / s)), levels) * s)) for v in blk]
            assert out[r, 16 * b:16 * (b + 1)].tolist() == exp_vals
    assert not bool(out.isnan().any())
