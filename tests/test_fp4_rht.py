"""Random Hadamard Transform (arXiv 2606.20381): orthogonal, seeded, cancels inside a GEMM."""
import math

import numpy as np
import pytest
import torch

from megatron_ufp4.fp4 import RHT, fake_quantize, quantize
from megatron_ufp4.fp4.hadamard import sylvester_hadamard
from fp4_reference import hadamard_ref

pytestmark = pytest.mark.numerical

SIZES = [16, 32, 64, 128]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128])
def test_sylvester_hadamard(n):
    h = sylvester_hadamard(n).double()
    assert h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert np.array_equal(h.numpy(), hadamard_ref(n))  # H[i, j] = (-1)^popcount(i & j)


@pytest.mark.parametrize("n", [0, 3, 12, 48])
def test_sylvester_hadamard_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match="power of two"):
        sylvester_hadamard(n)


@pytest.mark.parametrize("n", SIZES)
def test_rht_matrix_is_signed_normalized_hadamard_and_orthogonal(n):
    r = RHT(n, seed=3)
    m = r.matrix64()
    assert m.shape == (n, n)
    signs = r.signs.double()
    assert bool(((signs == 1) | (signs == -1)).all())
    expected = signs.numpy()[:, None] * hadamard_ref(n) / math.sqrt(n)  # diag(signs) H / sqrt(n)
    assert np.allclose(m.numpy(), expected, rtol=0, atol=1e-7)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(m @ m.T, eye, rtol=0, atol=1e-6)
    assert torch.allclose(m.T @ m, eye, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
def test_rht_signs_are_random_but_seeded(n):
    a, b, c = RHT(n, seed=5), RHT(n, seed=5), RHT(n, seed=6)
    assert torch.equal(a.signs, b.signs) and a == b
    assert not torch.equal(a.signs, c.signs) and a != c
    assert 0 < int((a.signs > 0).sum()) < n  # not a constant vector
    restored = RHT.from_state_dict(a.state_dict())
    assert restored == a and torch.equal(restored.matrix64(), a.matrix64())


def test_rht_rejects_bad_size_and_signs():
    with pytest.raises(ValueError, match="size"):
        RHT(24)
    with pytest.raises(ValueError, match="signs"):
        RHT(16, signs=torch.full((16,), 0.5))
    with pytest.raises(ValueError, match="signs"):
        RHT(16, signs=torch.ones(8))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_rotate_is_blockwise_matrix_product_and_unrotate_inverts(n, axis):
    g = torch.Generator().manual_seed(n)
    shape = [2 * n, 2 * n, 3]
    shape[axis if axis >= 0 else 2] = 2 * n
    if axis == -1:
        shape = [3, 5, 2 * n]
    x = torch.randn(*shape, generator=g)
    r = RHT(n, seed=1)
    y = r.rotate(x, axis=axis)
    assert y.shape == x.shape
    # float64 reference: tile the rotated axis into n-element blocks and multiply by diag(s) H / sqrt(n)
    m = torch.from_numpy(r.signs.double().numpy()[:, None] * hadamard_ref(n) / math.sqrt(n))
    xm = x.double().movedim(axis, -1)
    ref = (xm.reshape(-1, n) @ m).reshape(xm.shape).movedim(-1, axis)
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5)
    back = r.unrotate(y, axis=axis)
    assert (back - x).abs().max().item() <= 1e-6 * x.abs().max().item()
    # energy is preserved per tile (orthogonal)
    assert torch.allclose(y.double().pow(2).sum(), x.double().pow(2).sum(), rtol=1e-6)


def test_rotate_rejects_misaligned_axis():
    with pytest.raises(ValueError, match="multiple of 16"):
        RHT(16).rotate(torch.randn(4, 24))


@pytest.mark.parametrize("n", SIZES)
def test_rht_cancels_inside_a_gemm(n):
    g = torch.Generator().manual_seed(100 + n)
    k = 2 * n
    x = torch.randn(6, k, generator=g, dtype=torch.float64)
    w = torch.randn(5, k, generator=g, dtype=torch.float64)
    r = RHT(n, seed=7)
    # float64: apply R (as stored, fp32 entries) tile by tile to both operands
    m = r.matrix64()
    xr = (x.reshape(-1, n) @ m).reshape(x.shape)
    wr = (w.reshape(-1, n) @ m).reshape(w.shape)
    assert torch.allclose(xr @ wr.T, x @ w.T, rtol=0, atol=1e-5)
    assert not torch.allclose(xr, x, atol=1e-3)  # it did rotate
    # the library's fp32 rotate() on both operands, product in float64
    y = r.rotate(x.float()).double() @ r.rotate(w.float()).double().T
    assert torch.allclose(y, x @ w.T, rtol=0, atol=1e-4 * math.sqrt(k))


# largest possible |dequant - x| per element, in units of the block decode scale: half the largest
# grid gap (E2M1: (6-4)/2, INT4: 1/2); MXFP4's floor scale also clips values in (6s, 8s) to 6s
GRID_HALF_GAP = {"e2m1": 1.0, "nvfp4": 1.0, "mxfp4": 2.0, "int4": 0.5}


@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("n", [16, 32])
@pytest.mark.parametrize("axis", [-1, 0])
def test_quantize_with_rht_dequantizes_in_original_basis(fmt, n, axis):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 64, generator=g)
    x[3, 5] = 40.0  # an outlier the rotation spreads
    r = RHT(n, seed=2)
    q = quantize(x, fmt, axis=axis, rht=r)
    rot = q.dequantize(rotated=True)
    orig = q.dequantize()
    # rotated-basis values are bitwise what fake_quantize (the emulated GEMM path) returns
    assert torch.equal(rot, fake_quantize(x, fmt, axis=axis, rht=r))
    # the default basis is the original one: unrotating the rotated values (float64 reference)
    m = r.matrix64().T
    rm = rot.double().movedim(axis, -1)
    ref = (rm.reshape(-1, n) @ m).reshape(rm.shape).movedim(-1, axis)
    assert (orig.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    assert not torch.allclose(orig, rot, atol=1e-2)
    # error bound: in the rotated basis each element is within half the largest grid gap times its
    # block's decode scale; the rotation is orthogonal, so the error norm is the same in x's basis
    xr = r.rotate(x, axis=axis).double()
    err_rot = (rot.double() - xr).movedim(axis, -1)
    blk = 32 if fmt == "mxfp4" else 16
    dec = q.decode_scales.double().reshape(*err_rot.shape[:-1], -1, 1)
    bound = GRID_HALF_GAP[fmt] * dec * (1 + 1e-5)
    assert bool((err_rot.reshape(*err_rot.shape[:-1], -1, blk).abs() <= bound).all())
    err = (orig.double() - x.double()).pow(2).sum()
    assert err <= (bound.expand(*err_rot.shape[:-1], -1, blk) ** 2).sum() * (1 + 1e-4)
    # and it actually approximates x
    assert (err / x.double().pow(2).sum()).item() < 0.05


def _butterfly_ref(t: np.ndarray) -> np.ndarray:
    """x @ H_n in float32 by the recursive definition H_2k = [[H_k, H_k], [H_k, -H_k]]: transform
    both halves, then (lo + hi, lo - hi). The same additions, in the same order, as the iterative
    reference butterfly, so the float32 results must agree bit for bit."""
    n = t.shape[-1]
    if n == 1:
        return t
    lo, hi = _butterfly_ref(t[..., : n // 2]), _butterfly_ref(t[..., n // 2:])
    return np.concatenate([lo + hi, lo - hi], axis=-1).astype(np.float32)


@pytest.mark.parametrize("n", SIZES)
def test_rotation_is_the_reference_butterfly_bit_for_bit(n):
    """The rotation every backend must reproduce: sign flip, butterfly, one fp32 scale (forward);
    butterfly, scale, sign flip (inverse)."""
    g = torch.Generator().manual_seed(40 + n)
    x = torch.randn(7, 3 * n, generator=g) * torch.logspace(-3, 3, 3 * n)
    r = RHT(n, seed=9)
    s = r.signs.numpy()
    scale = np.float32(1.0 / math.sqrt(n))
    tiles = x.numpy().reshape(-1, n)
    want = (_butterfly_ref(tiles * s) * scale).reshape(x.shape)
    assert np.array_equal(r.rotate(x).numpy().view(np.int32), want.view(np.int32))
    want_inv = ((_butterfly_ref(tiles) * scale) * s).reshape(x.shape)
    assert np.array_equal(r.unrotate(x).numpy().view(np.int32), want_inv.view(np.int32))


@pytest.mark.parametrize("n", SIZES)
def test_butterfly_within_its_rounding_bound(n):
    """Against the float64 matrix product: log2(n) fp32 add stages, the fp32 rounding of 1/sqrt(n)
    and the scale multiply put each output within gamma_(log2 n + 2) * sum|x_tile| / sqrt(n) (every
    partial sum is bounded by the tile's L1 norm; gamma_m = m u / (1 - m u), u = 2^-24)."""
    g = torch.Generator().manual_seed(60 + n)
    x = torch.randn(32, 4 * n, generator=g)
    r = RHT(n, seed=2)
    ref = (x.double().reshape(-1, n) @ r.matrix64()).reshape(x.shape)
    m = int(math.log2(n)) + 2
    gamma = m * 2.0 ** -24 / (1 - m * 2.0 ** -24)
    l1 = x.double().abs().reshape(-1, n).sum(-1, keepdim=True).expand(-1, n).reshape(x.shape)
    assert bool(((r.rotate(x).double() - ref).abs() <= gamma * l1 / math.sqrt(n)).all())


@pytest.mark.parametrize("n", SIZES)
def test_both_spellings_of_the_butterfly_agree_bit_for_bit(n):
    """The eager stage form and the unrolled form torch.compile fuses are the same operations."""
    from megatron_ufp4.fp4.hadamard import _fwht_stages, _fwht_unrolled

    g = torch.Generator().manual_seed(80 + n)
    x = torch.randn(50, 2 * n, generator=g).reshape(-1, n) * torch.logspace(-5, 5, n)
    assert torch.equal(_fwht_stages(x).view(torch.int32), _fwht_unrolled(x).view(torch.int32))
