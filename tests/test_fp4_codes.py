"""Element codes and packed bytes equal the hardware / Transformer Engine / torchao conversion.

Those converters take the sign bit straight from the fp32 input of the element cast, so a
negative scaled value (or -0.0) that rounds to magnitude 0 is code 8 ("-0"), not code 0.
The reference here (tests/fp4_reference.py) recomputes the block scales, the scaled values
and the codes with numpy and compares every code and every packed byte.
"""
import numpy as np
import pytest
import torch

from megatron_ufp4.fp4 import RHT, fake_quantize, get_grid, quantize
from fp4_reference import (fp4_codes_ref, levels_for, pack_ref, scaled_blocks_ref, sr_level_indices)

pytestmark = pytest.mark.numerical

# (format name, quantize options, reference scale kind, block, grid levels)
CASES = {
    "e2m1": ("e2m1", {}, "e2m1", 16, levels_for("e2m1")),
    "nvfp4": ("nvfp4", {}, "nvfp4", 16, levels_for("e2m1")),
    "mxfp4": ("mxfp4", {}, "mxfp4", 32, levels_for("e2m1")),
    "int4": ("int4", {}, "int4", 16, levels_for("int4")),
    "nvint4": ("nvint4", {}, "nvint4", 16, levels_for("int4")),
    "e2m1_max2": ("e2m1", {"max_level": 2}, "e2m1", 16, levels_for("e2m1", 2)),
    "e2m1_max3": ("e2m1", {"max_level": 3}, "e2m1", 16, levels_for("e2m1", 3)),
    "e2m1_max4": ("e2m1", {"max_level": 4}, "e2m1", 16, levels_for("e2m1", 4)),
}


def _gaussian(seed=0):
    return torch.randn(128, 256, generator=torch.Generator().manual_seed(seed))


def _rht(case, use_rht):
    return RHT(CASES[case][3], seed=3) if use_rht else None


def _reference_input(x, rht):
    # The rotation itself is checked against the closed-form Hadamard matrix in test_fp4_rht.py;
    # what is under test here is the encoding of the rotated values, so the reference starts
    # from the same fp32 rotated tensor (a float64 rotation would differ by an ulp here and
    # there and move values across rounding boundaries, which is not what this test is about).
    return (rht.rotate(x) if rht is not None else x).numpy()


@pytest.mark.parametrize("use_rht", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rtne_codes_and_packed_bytes_match_reference(case, use_rht):
    fmt, kw, kind, block, levels = CASES[case]
    x = _gaussian()
    rht = _rht(case, use_rht)
    q = quantize(x, fmt, rht=rht, **kw)
    scaled = scaled_blocks_ref(_reference_input(x, rht), kind, block, levels)
    ref = fp4_codes_ref(scaled, levels)
    codes = q.codes.numpy()
    n_neg_zero = int(((ref == 8)).sum())
    assert n_neg_zero > 0  # the case under test occurs in this tensor
    diff = int((codes != ref).sum())
    assert diff == 0, f"{diff} of {ref.size} codes differ ({n_neg_zero} reference codes are -0)"
    assert np.array_equal(q.packed().numpy(), pack_ref(ref))
    # values: code 8 decodes to a zero (either sign), so the dequantized values are unchanged
    assert torch.equal(q.dequantize(rotated=True), fake_quantize(x, fmt, rht=rht, **kw))


@pytest.mark.parametrize("use_rht", [False, True])
@pytest.mark.parametrize("case", ["e2m1", "nvfp4", "mxfp4", "int4", "nvint4", "e2m1_max3"])
def test_sr_codes_sign_bit_and_neighbours_match_reference(case, use_rht):
    fmt, kw, kind, block, levels = CASES[case]
    x = _gaussian(1)
    rht = _rht(case, use_rht)
    q = quantize(x, fmt, rht=rht, rounding="sr", generator=torch.Generator().manual_seed(9), **kw)
    scaled = scaled_blocks_ref(_reference_input(x, rht), kind, block, levels)
    codes = q.codes.numpy()
    # the sign bit is the sign bit of the scaled value, whatever magnitude SR picked
    assert np.array_equal(codes >> 3, np.signbit(scaled).astype(np.uint8))
    lo, hi = sr_level_indices(np.abs(scaled), levels)
    mag = codes & 7
    assert bool(((mag == lo) | (mag == hi)).all())
    assert int((codes == 8).sum()) > 0  # negative values rounded to zero occur here
    assert np.array_equal(q.packed().numpy(), pack_ref(codes))


@pytest.mark.parametrize("case", sorted(CASES))
def test_signed_zeros_and_tiny_values_by_hand(case):
    fmt, kw, _, block, levels = CASES[case]
    x = torch.zeros(2, block)
    x[:, 0] = levels[-1]  # block scale 1 for the fp32/e8m0 scales
    x[0, 1:6] = torch.tensor([-0.0, 0.0, -1e-3, 1e-3, -levels[1] / 2])  # -half the first step: tie to 0
    x[1] = -0.0  # an all-zero block of negative zeros (scale 0)
    q = quantize(x, fmt, **kw)
    assert q.codes[0, 1:6].tolist() == [8, 0, 8, 0, 8]
    assert q.codes[1].tolist() == [8] * block
    expected = torch.zeros(2, block)
    expected[0, 0] = levels[-1]
    assert torch.equal(q.dequantize(), expected)  # -0 codes decode to zeros


def test_grid_encode_takes_the_sign_bit():
    grid = get_grid("e2m1")
    q = torch.tensor([0.0, -0.0, 0.5, -0.5, 6.0, -6.0])
    assert grid.encode(q).tolist() == [0, 8, 1, 9, 7, 15]
    assert grid.decode(grid.encode(q)).tolist() == q.tolist()  # -0.0 == 0.0 as values
