"""Packed storage, fake_quantize == quantize().dequantize(rotated=True), shapes, dtypes, bad input."""
import pytest
import torch

from megatron_ufp4.fp4 import FORMATS, RHT, fake_quantize, pack_codes, quantize, unpack_codes

pytestmark = pytest.mark.numerical


def _bits(t):
    """Bit pattern of an fp32 tensor, with -0.0 folded onto +0.0 and NaNs canonicalised."""
    t = t.float() + 0.0  # IEEE: -0.0 + 0.0 == +0.0
    t = torch.where(t.isnan(), torch.full_like(t, float("nan")), t)
    return t.view(torch.int32)


# ---------------------------------------------------------------------------------------------
# nibble packing
# ---------------------------------------------------------------------------------------------


def test_pack_nibble_order_by_hand():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0, 0x8, 0x7]], dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 3)
    assert packed.tolist() == [[0x21, 0x0F, 0x78]]  # element 2i low nibble, 2i+1 high nibble
    assert torch.equal(unpack_codes(packed), codes)


def test_pack_unpack_round_trip_random():
    codes = torch.randint(0, 16, (3, 5, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (3, 5, 16)
    lo, hi = codes[..., 0::2].int(), codes[..., 1::2].int()
    assert torch.equal(packed.int(), lo + 16 * hi)
    assert torch.equal(unpack_codes(packed), codes)


def test_pack_rejects_odd_last_dim():
    with pytest.raises(ValueError, match="even"):
        pack_codes(torch.zeros(4, 3, dtype=torch.uint8))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantized_tensor_packed(fmt):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    q = quantize(x, fmt)
    p = q.packed()
    assert p.dtype == torch.uint8 and p.shape == (32, 32)
    assert q.codes.shape == x.shape and q.codes.dtype == torch.uint8 and int(q.codes.max()) < 16
    assert torch.equal(unpack_codes(p), q.codes)
    assert q.shape == x.shape


# ---------------------------------------------------------------------------------------------
# fake_quantize == quantize(...).dequantize(rotated=True)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("use_rht", [False, True])
def test_fake_quantize_equals_dequantize(fmt, rounding, axis, use_rht):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * 3
    x[5, 7] = 50.0
    x[:16, 32:64] = 0.0  # an all-zero block (scale 0) along either axis
    rht = RHT(32 if fmt == "mxfp4" else 16, seed=4) if use_rht else None
    if axis == 0:
        x = x[:, :64]  # keep the axis-0 extent a multiple of 32 as well
    kw = dict(axis=axis, rounding=rounding, rht=rht)
    ga, gb = torch.Generator().manual_seed(77), torch.Generator().manual_seed(77)
    fq = fake_quantize(x, fmt, generator=ga, **kw)
    dq = quantize(x, fmt, generator=gb, **kw).dequantize(rotated=True)
    assert fq.dtype == dq.dtype == torch.float32 and fq.shape == dq.shape == x.shape
    assert torch.equal(_bits(fq), _bits(dq))
    assert torch.equal(ga.get_state(), gb.get_state())  # the same number of draws


@pytest.mark.parametrize("axis", [0, -1])
def test_fake_quantize_equals_dequantize_nvfp4_2d(axis):
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    fq = fake_quantize(w, "nvfp4", axis=axis, block_2d=True)
    dq = quantize(w, "nvfp4", axis=axis, block_2d=True).dequantize(rotated=True)
    assert torch.equal(_bits(fq), _bits(dq))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fake_quantize_signed_zero_matches_dequantize(fmt):
    # a small negative value that rounds to zero is stored as code 8 (-0, as hardware does) and
    # both paths give -0.0: bitwise equal, sign bit included
    x = torch.zeros(2, 32)
    x[:, 0] = 6.0
    x[:, 1] = -1e-4
    q = quantize(x, fmt)
    fq = fake_quantize(x, fmt)
    assert bool((q.codes[:, 1] == 8).all())
    assert torch.equal(fq.view(torch.int32), q.dequantize(rotated=True).view(torch.int32))
    assert bool((fq[:, 1] == 0).all()) and bool(torch.signbit(fq[:, 1]).all())


# ---------------------------------------------------------------------------------------------
# shapes and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_3d_input_equals_flattened_2d(fmt):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    q3 = quantize(x, fmt)
    q2 = quantize(x.reshape(15, 64), fmt)
    assert q3.codes.shape == x.shape
    assert torch.equal(q3.codes.reshape(15, 64), q2.codes)
    assert torch.equal(q3.dequantize().reshape(15, 64), q2.dequantize())
    assert torch.equal(fake_quantize(x, fmt).reshape(15, 64), q2.dequantize())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("axis", [0, 1])
def test_3d_input_along_other_axes(fmt, axis):
    x = torch.randn(32, 64, 3, generator=torch.Generator().manual_seed(5))
    q = quantize(x, fmt, axis=axis)
    ref = quantize(x.movedim(axis, -1).contiguous(), fmt, axis=-1)
    assert torch.equal(q.dequantize(), ref.dequantize().movedim(-1, axis))
    assert torch.equal(q.codes, ref.codes.movedim(-1, axis))
    rht = RHT(32, seed=1)
    a = quantize(x, fmt, axis=axis, rht=rht).dequantize(rotated=True)
    b = quantize(x.movedim(axis, -1).contiguous(), fmt, rht=rht).dequantize(rotated=True).movedim(-1, axis)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(fmt, dtype):
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(6)) * 5).to(dtype)
    q = quantize(x, fmt)
    ref = quantize(x.float(), fmt)  # the upcast is exact, so the result must be identical
    assert q.orig_dtype == dtype
    assert torch.equal(q.codes, ref.codes)
    assert torch.equal(q.dequantize(), ref.dequantize())
    assert q.dequantize().dtype == torch.float32
    assert torch.equal(_bits(fake_quantize(x, fmt)), _bits(q.dequantize(rotated=True)))
    rht = RHT(32, seed=0)
    assert torch.equal(quantize(x, fmt, rht=rht).dequantize(), quantize(x.float(), fmt, rht=rht).dequantize())


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
@pytest.mark.parametrize("fmt,shape", [("e2m1", (4, 20)), ("int4", (4, 8)), ("mxfp4", (4, 48)), ("nvfp4", (4, 24))])
def test_shape_not_divisible_by_block(fn, fmt, shape):
    with pytest.raises(ValueError, match=rf"size {shape[-1]}, not a multiple of the block size"):
        fn(torch.randn(*shape), fmt)


def test_2d_block_needs_both_dims_divisible():
    with pytest.raises(ValueError, match="not a multiple of the 16x16 block"):
        quantize(torch.randn(24, 32), "nvfp4", block_2d=True)
    with pytest.raises(ValueError, match="2-D tensor"):
        quantize(torch.randn(2, 16, 32), "nvfp4", block_2d=True)


def test_rht_size_must_divide_axis():
    with pytest.raises(ValueError, match="RHT of size 32"):
        quantize(torch.randn(4, 48), "e2m1", rht=RHT(32))


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_non_float_dtype(fn, dtype):
    with pytest.raises(ValueError, match="floating-point"):
        fn(torch.ones(2, 16, dtype=dtype), "e2m1")


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("use_rht", [False, True])
def test_nonfinite_raises(fn, fmt, bad, use_rht):
    x = torch.randn(4, 64)
    x[2, 33] = bad
    rht = RHT(32) if use_rht else None
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(x, fmt, rht=rht)


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
def test_nonfinite_raises_for_half_and_sr(fn):
    x = torch.randn(2, 32).bfloat16()
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(x, "int4", rounding="sr", generator=torch.Generator().manual_seed(0))


def test_unknown_nonfinite_mode_is_rejected():
    # a typo must not silently disable the NaN/Inf guard
    x = torch.randn(2, 16)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="nonfinite"):
        quantize(x, "e2m1", nonfinite="rasie")


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
def test_unknown_format(fn):
    with pytest.raises(ValueError, match="unknown format 'fp5'"):
        fn(torch.randn(2, 16), "fp5")


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
def test_unknown_rounding(fn):
    with pytest.raises(ValueError, match="unknown rounding 'nearest'"):
        fn(torch.randn(2, 16), "e2m1", rounding="nearest")


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
@pytest.mark.parametrize("axis", [2, -3, 5])
def test_bad_axis(fn, axis):
    with pytest.raises(ValueError, match=rf"axis {axis} is out of range"):
        fn(torch.randn(16, 16), "e2m1", axis=axis)


def test_bad_format_options():
    with pytest.raises(ValueError, match="max_level"):
        quantize(torch.randn(2, 16), "e2m1", max_level=5)
    with pytest.raises(ValueError, match="max_level"):
        quantize(torch.randn(2, 16), "int4", max_level=4)
    with pytest.raises(ValueError, match="scale_mode"):
        quantize(torch.randn(2, 32), "mxfp4", scale_mode="even")
    with pytest.raises(ValueError, match="block"):
        quantize(torch.randn(2, 64), "e2m1", block=64)


# ---------------------------------------------------------------------------------------------
# nonfinite="propagate"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_propagate_marks_only_the_affected_block(fmt, bad):
    blk = FORMATS[fmt].block
    x = torch.randn(3, 2 * blk, generator=torch.Generator().manual_seed(8))
    x[1, blk + 3] = bad
    for out in (quantize(x, fmt, nonfinite="propagate").dequantize(), fake_quantize(x, fmt, nonfinite="propagate")):
        assert bool(out[1, blk:].isnan().all())  # the affected block: NaN, never a number
        rest = torch.cat([out[:1].flatten(), out[2:].flatten(), out[1, :blk]])
        assert bool(torch.isfinite(rest).all())  # every other block stays finite
    if FORMATS[fmt].scale != "e4m3":  # block-local scales: the clean blocks are unchanged
        clean = x.clone()
        clean[1, blk:] = 0.0
        out = quantize(x, fmt, nonfinite="propagate").dequantize()
        ref = quantize(clean, fmt).dequantize()
        assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2]) and torch.equal(out[1, :blk], ref[1, :blk])
