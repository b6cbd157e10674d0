"""Stochastic rounding (arXiv 2606.20381): unbiased, only neighbouring levels, seeded and reproducible."""
import math

import pytest
import torch

from megatron_ufp4.fp4 import fake_quantize, quantize
from fp4_reference import levels_for, sr_neighbours

pytestmark = pytest.mark.numerical

N_DRAWS = 2000  # independent SR draws of the same block (rows of one tensor)
Z = 5.0  # per-element bound in standard errors of the mean


def _unit_scale_block(fmt, g):
    """One block whose block scale is exactly 1 (its amax equals the grid max), values inside the range."""
    grid_max, block, kw = {
        "e2m1": (6.0, 16, {}), "int4": (7.0, 16, {}), "mxfp4": (6.0, 32, {}),
        "e2m1_max3": (3.0, 16, {"max_level": 3}),
    }[fmt]
    x = (torch.rand(block, generator=g, dtype=torch.float64) * 2 - 1) * grid_max
    x[0] = grid_max
    x[1] = -grid_max / 3  # sometimes on a level, sometimes between
    x[2] = 0.0
    return x.float(), grid_max, kw


def _levels(fmt):
    return levels_for("int4") if fmt == "int4" else levels_for("e2m1", 3 if fmt == "e2m1_max3" else None)


def _fmt_name(fmt):
    return "e2m1" if fmt == "e2m1_max3" else fmt


@pytest.mark.parametrize("fmt", ["e2m1", "int4", "mxfp4", "e2m1_max3"])
def test_sr_is_unbiased_and_uses_only_neighbours(fmt):
    g = torch.Generator().manual_seed(11)
    x, _, kw = _unit_scale_block(fmt, g)
    levels = _levels(fmt)
    xs = x.expand(N_DRAWS, -1).contiguous()  # every row is a fresh draw of the same block
    q = quantize(xs, _fmt_name(fmt), rounding="sr", generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(q.decode_scales, torch.ones_like(q.decode_scales))  # the block scale is 1
    d = q.dequantize().double()
    for j, v in enumerate(x.double().tolist()):
        lo, hi, p = sr_neighbours(v, levels)
        s = -1.0 if v < 0 else 1.0
        col = d[:, j]
        # only the two neighbouring levels ever appear
        assert bool(((col == s * lo) | (col == s * hi)).all()), (v, set(col.tolist()))
        # E[SR(v)] = v: the sample mean of N Bernoulli(p) steps of size (hi - lo) has standard error
        # sqrt(p (1 - p) / N) * (hi - lo); elements on a level (p = 0) must be exact
        se = math.sqrt(p * (1 - p) / N_DRAWS) * (hi - lo)
        assert abs(col.mean().item() - v) <= Z * se + 1e-12, (v, col.mean().item(), se)


@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4"])
def test_sr_is_unbiased_with_general_scale(fmt):
    # non-unit scale: E[dequant] = x for every element inside the range (here x never saturates)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(16, generator=g, dtype=torch.float64).float() * 3.7
    xs = x.expand(N_DRAWS, -1).contiguous()
    q = quantize(xs, fmt, rounding="sr", generator=torch.Generator().manual_seed(6))
    dec = q.decode_scales.double().flatten()
    assert bool((dec == dec[0]).all())  # every row is the same block, so the same scale
    gap = 2.0 if fmt != "int4" else 1.0  # largest grid gap, in scaled units
    d = q.dequantize().double()
    mean_err = (d.mean(0) - x.double()).abs()
    # standard error of each column mean is at most (gap/2) * dec / sqrt(N)
    bound = Z * (gap / 2) * dec[0] / math.sqrt(N_DRAWS)
    assert bool((mean_err <= bound).all()), (mean_err.max().item(), bound.item())


def test_rtne_is_biased_where_sr_is_not():
    # guards the test above against being vacuous: a deterministic rounder fails the same bound
    x = torch.zeros(16)
    x[0], x[1] = 6.0, 2.4  # scale 1; RTNE(2.4) = 2, off by 0.4
    xs = x.expand(N_DRAWS, -1).contiguous()
    rt = quantize(xs, "e2m1").dequantize().double().mean(0)
    sr = quantize(xs, "e2m1", rounding="sr", generator=torch.Generator().manual_seed(1)).dequantize().double().mean(0)
    se = math.sqrt(0.4 * 0.6 / N_DRAWS) * 1.0
    assert abs(rt[1].item() - 2.4) > Z * se
    assert abs(sr[1].item() - 2.4) <= Z * se


@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_sr_same_seed_same_codes_different_seed_different(fmt):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    a = quantize(x, fmt, rounding="sr", generator=torch.Generator().manual_seed(123))
    b = quantize(x, fmt, rounding="sr", generator=torch.Generator().manual_seed(123))
    c = quantize(x, fmt, rounding="sr", generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.dequantize(), b.dequantize())
    assert not torch.equal(a.codes, c.codes)


def test_sr_draws_continue_from_generator_state():
    # resuming from a saved generator state replays the same draws
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(7)
    quantize(x, "int4", rounding="sr", generator=g)
    state = g.get_state()
    second = quantize(x, "int4", rounding="sr", generator=g).codes
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(quantize(x, "int4", rounding="sr", generator=g2).codes, second)


def test_sr_advances_the_generator():
    g = torch.Generator().manual_seed(9)
    before = g.get_state().clone()
    quantize(torch.randn(2, 16), "e2m1", rounding="sr", generator=g)
    assert not torch.equal(g.get_state(), before)


@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("fake", [False, True])
def test_rtne_never_touches_generators(fmt, fake):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(42)
    g_before = g.get_state().clone()
    global_before = torch.get_rng_state().clone()
    if fake:
        out = fake_quantize(x, fmt, rounding="rtne", generator=g)
        ref = fake_quantize(x, fmt, rounding="rtne")
    else:
        out = quantize(x, fmt, rounding="rtne", generator=g).dequantize()
        ref = quantize(x, fmt, rounding="rtne", generator=torch.Generator().manual_seed(999)).dequantize()
    assert torch.equal(g.get_state(), g_before)
    assert torch.equal(torch.get_rng_state(), global_before)
    assert torch.equal(out, ref)  # the result cannot depend on a generator


def test_sr_with_a_generator_leaves_global_rng_alone():
    before = torch.get_rng_state().clone()
    quantize(torch.ones(2, 16), "e2m1", rounding="sr", generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)
