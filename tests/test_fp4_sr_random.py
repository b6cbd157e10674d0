"""Counter-based SR draws: uniform, reproducible, and independent of how a tensor is split."""
import math

import pytest
import torch

from megatron_ufp4.fp4 import fake_quantize, quantize
from megatron_ufp4.fp4.sr_random import SRIndex, element_index, uniform_from_index

pytestmark = pytest.mark.numerical


def test_draws_are_uniform_and_uncorrelated():
    u = uniform_from_index(torch.arange(1 << 20), key=12345).double()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=64, min=0.0, max=1.0)
    expected = u.numel() / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 63 + 5 * math.sqrt(2 * 63)  # chi-square, 63 dof, ~5 sigma
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    lag1 = float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])
    assert abs(lag1) < 5 / math.sqrt(u.numel())
    narrow = uniform_from_index(torch.arange(1 << 20), key=12345, wide=False).double()
    assert abs(float(narrow.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert abs(float(torch.corrcoef(torch.stack([narrow[:-1], narrow[1:]]))[0, 1])) < 5 / math.sqrt(u.numel())
    counts = torch.histc(narrow, bins=64, min=0.0, max=1.0)
    assert float(((counts - expected) ** 2 / expected).sum()) < 63 + 5 * math.sqrt(2 * 63)
    other = uniform_from_index(torch.arange(1 << 20), key=12346).double()
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 5 / math.sqrt(u.numel())


def test_indices_beyond_2_pow_31_use_the_high_bits():
    base = torch.arange(1 << 16)
    lo = uniform_from_index(base, key=9)
    hi = uniform_from_index(base + (1 << 31), key=9)
    assert not torch.equal(lo, hi)
    assert abs(float(torch.corrcoef(torch.stack([lo.double(), hi.double()]))[0, 1])) < 5 / math.sqrt(base.numel())


def test_draws_below_2_pow_31_do_not_depend_on_the_rest_of_the_tensor():
    """A shard that stays below 2^31 of a logical tensor that goes beyond it (e.g. one TP
    rank's Dgrad operand of a 2^31-element dY) must draw what the unsplit tensor draws."""
    straddling = torch.arange((1 << 31) - 1000, (1 << 31) + 1000)
    whole = uniform_from_index(straddling, key=77)  # needs the wide path
    below = uniform_from_index(straddling[:1000], key=77, wide=False)
    assert torch.equal(whole[:1000], below)
    assert torch.equal(uniform_from_index(straddling[:1000], key=77), below)


def test_element_index_matches_row_major_positions():
    idx = element_index((3, 4), SRIndex(row_offset=2, col_offset=8, row_stride=16), "cpu")
    expected = torch.tensor([[(r + 2) * 16 + c + 8 for c in range(4)] for r in range(3)])
    assert torch.equal(idx, expected)


def test_sharded_sr_equals_unsplit_sr():
    """Column and row shards that pass their offsets round exactly like the full tensor."""
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    full = fake_quantize(x, "int4", rounding="sr", generator=torch.Generator().manual_seed(7))
    for part in range(2):
        cols = slice(64 * part, 64 * (part + 1))
        shard = fake_quantize(x[:, cols], "int4", rounding="sr", generator=torch.Generator().manual_seed(7),
                              sr_index=SRIndex(col_offset=64 * part, row_stride=128))
        assert torch.equal(shard, full[:, cols])
        rows = slice(16 * part, 16 * (part + 1))
        shard = quantize(x[rows], "e2m1", rounding="sr", generator=torch.Generator().manual_seed(7),
                         sr_index=SRIndex(row_offset=16 * part))
        ref = quantize(x, "e2m1", rounding="sr", generator=torch.Generator().manual_seed(7))
        assert torch.equal(shard.codes, ref.codes[rows])


def test_each_call_draws_a_new_key():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64)
    a = fake_quantize(x, "int4", rounding="sr", generator=g)
    b = fake_quantize(x, "int4", rounding="sr", generator=g)
    assert not torch.equal(a, b)


def test_int32_draws_equal_int64_draws():
    """The int32 hash (used when every index is below 2^31) wraps its products modulo 2^32;
    the low 31 bits it keeps are the int64 product's, so the draws are the same bits.  Odd
    lengths exercise the scalar tails next to the vectorised bodies."""
    g = torch.Generator().manual_seed(7)
    idx = torch.cat([torch.randint(0, 2 ** 31 - 1, (100_003,), generator=g, dtype=torch.int64),
                     torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31 - 2, 2 ** 30])])
    for key in (0, 1, 0x5BD1E995, 2 ** 31 - 1):
        want = uniform_from_index(idx, key, wide=False)
        assert torch.equal(uniform_from_index(idx.to(torch.int32), key), want), key
        assert torch.equal(uniform_from_index(idx, key, wide=True), want), key
    shape, where = (37, 129), SRIndex(row_offset=5, col_offset=3, row_stride=4099)
    assert torch.equal(element_index(shape, where, "cpu", torch.int32).long(), element_index(shape, where, "cpu"))
