"""Element grids (arXiv 2606.20381): exact values, RTNE ties, code layout, saturation, range restriction."""
import math

import pytest
import torch

from megatron_ufp4.fp4 import E2M1, INT4, Grid, get_grid, quantize
from fp4_reference import E2M1_LEVELS, INT4_LEVELS, levels_for, rtne_ref

pytestmark = pytest.mark.numerical

# ---------------------------------------------------------------------------------------------
# exact grid values through quantize(...).dequantize() with a unit block scale
# ---------------------------------------------------------------------------------------------


def _signed_block(levels, block):
    """Every signed grid value once (the max included so the FP32 scale is exactly 1), zero-padded."""
    vals = list(levels) + [-v for v in levels[1:]]
    return torch.tensor(vals + [0.0] * (block - len(vals)), dtype=torch.float32)


@pytest.mark.parametrize("fmt,levels,block", [
    ("e2m1", E2M1_LEVELS, 16),   # FP32 scale amax/6 = 1
    ("int4", INT4_LEVELS, 16),   # FP32 scale amax/7 = 1
    ("mxfp4", E2M1_LEVELS, 32),  # E8M0 floor scale 2^(floor(log2 6) - 2) = 1
])
def test_grid_values_roundtrip_exactly(fmt, levels, block):
    x = _signed_block(levels, block)
    q = quantize(x, fmt)
    assert q.decode_scales.flatten().tolist() == [1.0]
    assert torch.equal(q.dequantize(), x)
    # the set of representable magnitudes is exactly the grid
    assert sorted(set(q.dequantize().abs().tolist())) == sorted(levels)


@pytest.mark.parametrize("fmt,levels", [("e2m1", E2M1_LEVELS), ("int4", INT4_LEVELS)])
def test_grid_values_with_power_of_two_scale(fmt, levels):
    # scale 2^-3: values are grid * 2^-3, all exactly representable, must round-trip bit-exactly
    x = _signed_block(levels, 16) / 8
    q = quantize(x, fmt)
    assert q.decode_scales.flatten().tolist() == [0.125]
    assert torch.equal(q.dequantize(), x)


def test_grid_objects_match_spec():
    assert E2M1.levels == E2M1_LEVELS and E2M1.max == 6.0 and not E2M1.uniform
    assert INT4.levels == INT4_LEVELS and INT4.max == 7.0 and INT4.uniform
    assert get_grid("e2m1") is E2M1 and get_grid("int4") is INT4


# ---------------------------------------------------------------------------------------------
# RTNE ties (arXiv 2606.20381): ties go to the even magnitude code
# ---------------------------------------------------------------------------------------------

E2M1_TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]
INT4_TIES = [(0.5, 0.0), (1.5, 2.0), (2.5, 2.0), (3.5, 4.0), (4.5, 4.0), (5.5, 6.0), (6.5, 6.0)]


def _with_anchor(v, anchor):
    """A 16-block [v, anchor, 0...]: the anchor (grid max) pins the FP32 scale to exactly 1."""
    x = torch.zeros(16)
    x[0], x[1] = v, anchor
    return x


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("v,expected", E2M1_TIES)
def test_e2m1_rtne_ties(v, expected, sign):
    out = quantize(_with_anchor(sign * v, 6.0), "e2m1").dequantize()
    assert out[0].item() == sign * expected if expected else out[0].item() == 0.0
    assert out[1].item() == 6.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("v,expected", INT4_TIES)
def test_int4_rtne_ties(v, expected, sign):
    out = quantize(_with_anchor(sign * v, 7.0), "int4").dequantize()
    assert out[0].item() == (sign * expected if expected else 0.0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("v,expected", E2M1_TIES)
def test_e2m1_rtne_ties_mxfp4(v, expected, sign):
    x = torch.zeros(32)
    x[0], x[5] = sign * v, 6.0  # E8M0 floor scale of amax 6 is 1
    out = quantize(x, "mxfp4").dequantize()
    assert out[0].item() == (sign * expected if expected else 0.0)


@pytest.mark.parametrize("grid,levels", [(E2M1, E2M1_LEVELS), (INT4, INT4_LEVELS)])
def test_rtne_matches_bruteforce_reference(grid, levels):
    # every midpoint, just either side of it, every level, and out-of-range values, both signs
    mids = [(a + b) / 2 for a, b in zip(levels[:-1], levels[1:])]
    pts = []
    for m in mids:
        pts += [m, math.nextafter(m, -math.inf), math.nextafter(m, math.inf)]
    pts += list(levels) + [levels[-1] + 0.3, levels[-1] * 10, 1e30]
    g = torch.Generator().manual_seed(1)
    pts += (torch.rand(400, generator=g, dtype=torch.float64) * (levels[-1] + 1)).tolist()
    v = torch.tensor(pts + [-p for p in pts], dtype=torch.float32)
    expected = torch.tensor([rtne_ref(float(t), levels) for t in v], dtype=torch.float32)
    got = grid.round_(v.clone(), "rtne")
    assert torch.equal(got, expected)


def test_rtne_generic_path_on_non_uniform_grid():
    # A grid that is neither uniform nor E2M1-shaped uses the general bucketize path.
    levels = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    grid = Grid("e2m1x2", levels)
    ties = {0.5: 0.0, 1.5: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 7.0: 8.0, 10.0: 8.0}
    v = torch.tensor(list(ties) + [-t for t in ties] + [0.6, 5.1, 9.9, 10.1, 13.0, -20.0])
    expected = torch.tensor([rtne_ref(float(t), levels) for t in v])
    assert torch.equal(grid.round_(v.clone(), "rtne"), expected)
    assert expected[: len(ties)].tolist() == list(ties.values())


# ---------------------------------------------------------------------------------------------
# code layout: sign bit 3 (the value's sign bit, so -0 is code 8), magnitude code bits 0-2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,levels,anchor", [("e2m1", E2M1_LEVELS, 6.0), ("int4", INT4_LEVELS, 7.0)])
def test_code_layout(fmt, levels, anchor):
    vals = list(levels) + [-v for v in levels[1:]] + [-0.0]
    x = torch.tensor(vals + [0.0] * (16 - len(vals)))
    codes = quantize(x, fmt).codes
    assert codes.dtype == torch.uint8
    expected = [i for i in range(8)] + [8 | i for i in range(1, 8)] + [8]  # -0.0 -> code 8, as hardware
    assert codes.tolist() == expected + [0] * (16 - len(expected))
    # decode the layout by hand: value = (-1)^bit3 * levels[bits 0..2]
    by_hand = [(-1.0 if c & 8 else 1.0) * levels[c & 7] for c in codes.tolist()]
    assert by_hand == x.tolist()
    assert [math.copysign(1.0, v) for v in by_hand] == [math.copysign(1.0, v) for v in x.tolist()]  # -0 too


@pytest.mark.parametrize("fmt,anchor", [("e2m1", 6.0), ("int4", 7.0), ("mxfp4", 6.0), ("nvfp4", 6.0)])
def test_negative_values_rounding_to_zero_get_code_eight(fmt, anchor):
    # TE / torchao / the hardware cast copy the input's sign bit: -0.0 and negatives that
    # round to magnitude 0 are code 8 ("-0"); +0.0 and positives that round to 0 are code 0
    block = 32 if fmt == "mxfp4" else 16
    x = torch.zeros(block)
    x[0], x[1], x[2], x[3], x[4] = anchor, -0.0, -1e-3, -0.2, 1e-3
    codes = quantize(x, fmt).codes
    assert codes[1:6].tolist() == [8, 8, 8, 0, 0]


# ---------------------------------------------------------------------------------------------
# saturation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amax", [6.5, 7.0, 7.99])
def test_mxfp4_floor_scale_saturates_to_grid_max(amax):
    # floor(log2 amax) = 2 -> scale 2^0 = 1, so amax/scale > 6 must clamp to ±6 (code 7 / 15)
    x = torch.zeros(32)
    x[0], x[1], x[2] = amax, -amax, 6.2
    q = quantize(x, "mxfp4")
    assert q.decode_scales.flatten().tolist() == [1.0]
    assert q.dequantize()[:3].tolist() == [6.0, -6.0, 6.0]
    assert q.codes[:3].tolist() == [7, 15, 7]


def test_mxfp4_rceil_does_not_saturate_same_block():
    x = torch.zeros(32)
    x[0], x[1] = 7.0, -7.0  # rceil: 2^ceil(log2(7/6)) = 2; 7/2 = 3.5 -> tie -> 4 -> 8
    q = quantize(x, "mxfp4", scale_mode="rceil")
    assert q.decode_scales.flatten().tolist() == [2.0]
    assert q.dequantize()[:2].tolist() == [8.0, -8.0]


@pytest.mark.parametrize("grid,cases", [
    (E2M1, [(6.0, 6.0), (6.01, 6.0), (7.0, 6.0), (1e30, 6.0), (float("inf"), 6.0)]),
    (INT4, [(7.0, 7.0), (7.49, 7.0), (7.5, 7.0), (8.0, 7.0), (1e30, 7.0), (float("inf"), 7.0)]),
])
def test_grid_rtne_saturates(grid, cases):
    v = torch.tensor([c for c, _ in cases] + [-c for c, _ in cases])
    expected = torch.tensor([e for _, e in cases] + [-e for _, e in cases])
    assert torch.equal(grid.round_(v.clone(), "rtne"), expected)  # -8 is never produced by INT4


@pytest.mark.parametrize("rounding", ["rtne", "sr"])
def test_saturation_with_both_roundings(rounding):
    # MXFP4 floor scale of amax 7.9 is 1: values in (6, 7.9] must land on ±6 whatever the rounding
    x = torch.zeros(4, 32)
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = 7.9, -7.0, 6.5, -6.01
    q = quantize(x, "mxfp4", rounding=rounding, generator=torch.Generator().manual_seed(3))
    assert torch.equal(q.decode_scales, torch.ones_like(q.decode_scales))
    assert q.dequantize()[:, :4].tolist() == [[6.0, -6.0, 6.0, -6.0]] * 4
    assert q.codes[:, :4].tolist() == [[7, 15, 7, 15]] * 4


def test_int4_full_scale_negative_uses_code_15():
    x = torch.zeros(16)
    x[0], x[1] = -8.0, 4.2  # amax 8 -> scale 8/7; -8 -> -7 (code 15), 4.2 -> 3.675 -> 4 (code 4)
    q = quantize(x, "int4")
    assert q.codes[:2].tolist() == [15, 4]
    assert q.scales.item() == torch.tensor(8.0 / 7.0, dtype=torch.float64).float().item()


# ---------------------------------------------------------------------------------------------
# range-restricted E2M1 (max_level 2, 3, 4)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_level", [2, 3, 4])
def test_range_restricted_grid_levels(max_level):
    g = get_grid("e2m1", max_level)
    assert g.levels == tuple(v for v in E2M1_LEVELS if v <= max_level)
    assert g.max == max_level


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("max_level", [2, 3, 4])
def test_range_restricted_unit_scale_rounding(max_level, sign):
    levels = levels_for("e2m1", max_level)
    probe = [0.25, 0.75, 1.25, 1.75, 1.9, 2.4, 2.5, 2.6, 2.9, 3.4, 3.5, 3.6]
    probe = [sign * p for p in probe if p < max_level]
    x = torch.tensor([sign * max_level] + probe + [0.0] * (15 - len(probe)))
    q = quantize(x, "e2m1", max_level=max_level)
    assert q.decode_scales.flatten().tolist() == [1.0]  # amax / max_level
    expected = torch.tensor([rtne_ref(float(v), levels) for v in x])
    assert torch.equal(q.dequantize(), expected)
    if max_level == 3:  # 2.5 is a tie between 2 (code 4) and 3 (code 5): even code wins
        assert q.dequantize()[1 + probe.index(sign * 2.5)].item() == sign * 2.0


@pytest.mark.parametrize("max_level", [2, 3, 4])
def test_range_restricted_scale_and_levels_random(max_level):
    g = torch.Generator().manual_seed(max_level)
    x = torch.randn(8, 32, generator=g)
    q = quantize(x, "e2m1", max_level=max_level)
    amax = x.double().abs().reshape(8, 2, 16).amax(-1)
    assert torch.equal(q.scales, (amax / max_level).float())  # fp32 scale = amax / max_level
    levels = levels_for("e2m1", max_level)
    mag = (q.codes & 7).long()
    assert int(mag.max()) == len(levels) - 1  # only levels <= max_level exist ...
    top = mag.reshape(8, 2, 16).amax(-1)
    assert bool((top == len(levels) - 1).all())  # ... and each block's amax lands on the top level
    sign = torch.where(q.codes >= 8, -1.0, 1.0)
    lv = torch.tensor(levels)[mag] * sign
    expected = (lv.reshape(8, 2, 16) * q.scales[..., None]).reshape(8, 32)
    assert torch.equal(q.dequantize(), expected)
    # nearest level: the error is at most half the largest gap of the restricted grid, times the scale
    err = (q.dequantize().double() - x.double()).abs().reshape(8, 2, 16)
    max_gap = max(b - a for a, b in zip(levels, levels[1:]))
    assert bool((err <= 0.5 * max_gap * q.scales.double()[..., None] * (1 + 1e-6)).all())


# ---------------------------------------------------------------------------------------------
# per-level shrinkage bias (arXiv 2606.20381)
# ---------------------------------------------------------------------------------------------


def test_per_level_bias_e2m1():
    b = E2M1.per_level_bias()
    assert len(b) == 8
    # interior levels 0.5, 1, 1.5, 2, 3, 4: (2q_i - q_{i-1} - q_{i+1}) / 4
    assert b[1:7] == [0.0, 0.0, 0.0, -0.125, 0.0, -0.25]
    assert b[E2M1.levels.index(2.0)] == -0.125
    assert b[E2M1.levels.index(4.0)] == -0.25


def test_per_level_bias_int4_is_zero():
    b = INT4.per_level_bias()
    assert len(b) == 8
    assert b[1:7] == [0.0] * 6
