"""Independent reference arithmetic for the FP4 tests (pure Python / numpy float32).

Nothing here imports ``megatron_ufp4``: these helpers restate arXiv 2606.20381 from scratch so
that the tests compare the package against an independent derivation, not against itself.
"""
from __future__ import annotations

import math

import numpy as np

E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
INT4_LEVELS = tuple(float(i) for i in range(8))
F32 = np.float32


def levels_for(grid: str, max_level=None) -> tuple[float, ...]:
    if grid == "int4":
        return INT4_LEVELS
    if max_level is None:
        return E2M1_LEVELS
    return tuple(v for v in E2M1_LEVELS if v <= max_level)


def rtne_ref(v: float, levels) -> float:
    """Nearest level to v (saturating at ±max); exact ties go to the even magnitude *code*."""
    mag = min(abs(float(v)), levels[-1])
    best = min(range(len(levels)), key=lambda i: (abs(levels[i] - mag), i % 2))
    out = levels[best]
    return -out if v < 0 else out


def sr_neighbours(v: float, levels) -> tuple[float, float, float]:
    """(lo, hi, p_up) in magnitude for a value inside the range, in float64."""
    mag = min(abs(float(v)), levels[-1])
    for lo, hi in zip(levels[:-1], levels[1:]):
        if lo <= mag <= hi:
            if mag == hi:
                return hi, hi, 0.0
            return lo, hi, (mag - lo) / (hi - lo)
    raise AssertionError("unreachable")


def half_gap(levels) -> float:
    return max(b - a for a, b in zip(levels[:-1], levels[1:])) / 2


def e4m3_ref(v: float) -> float:
    """Round a non-negative finite value (<= 448) to float8 e4m3fn, round-half-even.

    Bias 7, 3 mantissa bits, min normal 2^-6, subnormal step 2^-9, max 448.
    """
    v = float(v)
    assert 0.0 <= v <= 448.0
    if v == 0.0:
        return 0.0
    e = max(math.floor(math.log2(v)), -6)
    # guard log2 inexactness near binade edges
    if 2.0 ** e > v and e > -6:
        e -= 1
    if 2.0 ** (e + 1) <= v:
        e += 1
    step = 2.0 ** (e - 3)
    return round(v / step) * step  # v/step is exact (power-of-two step); round() is half-even


def nvfp4_ref(blocks, tensor_amax=None, levels=E2M1_LEVELS):
    """TE's NVFP4 arithmetic, one fp32 operation at a time (numpy float32), on the grid
    ``levels`` (E2M1, gmax 6; the uniform grid 0..7 is nvint4, gmax 7).

    ``blocks``: list of 1-D float sequences (already fp32 values).  Returns
    (S_enc, [S_dec_b], g_dec, [decode], [[dequantized element]]).
    """
    gmax = F32(levels[-1])
    blocks = [[F32(x) for x in b] for b in blocks]
    amaxes = [max(abs(x) for x in b) for b in blocks]
    t_amax = F32(max(amaxes) if tensor_amax is None else tensor_amax)
    with np.errstate(divide="ignore", over="ignore"):
        s_enc = F32(F32(448.0 * gmax) / t_amax) if t_amax != 0 else F32(1.0)
    if s_enc == 0:
        s_enc = F32(1.0)
    if not np.isfinite(s_enc):
        s_enc = F32(np.finfo(np.float32).max)
    s_enc_over_gmax = F32(s_enc * F32(F32(1.0) / gmax))
    g_dec = F32(F32(1.0) / s_enc)
    s_dec, dec, deq = [], [], []
    for b, a in zip(blocks, amaxes):
        sd = F32(e4m3_ref(min(float(F32(a * s_enc_over_gmax)), 448.0)))
        d = F32(sd * g_dec)
        with np.errstate(divide="ignore"):
            enc = F32(F32(1.0) / d) if d != 0 else F32(np.finfo(np.float32).max)
        with np.errstate(over="ignore"):
            vals = [F32(rtne_ref(float(F32(x * enc)), levels)) * d for x in b]
        s_dec.append(float(sd))
        dec.append(float(d))
        deq.append([float(F32(v)) for v in vals])
    return float(s_enc), s_dec, float(g_dec), dec, deq


def hadamard_ref(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix by the closed form H[i, j] = (-1)^popcount(i & j)."""
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    bits = np.vectorize(lambda v: bin(int(v)).count("1"))(i & j)
    return np.where(bits % 2 == 0, 1.0, -1.0)


# -----------------------------------------------------------------------------
# element codes, the way hardware / Transformer Engine / torchao convert fp32 -> FP4:
# code = sign << 3 | magnitude index, the sign taken from the fp32 sign bit of the scaled
# value (so a negative value, or -0.0, that rounds to magnitude 0 is code 8, "-0")

def nearest_level_index(mag: np.ndarray, levels) -> np.ndarray:
    """Index of the nearest level to each magnitude (float64), saturating; ties -> even index."""
    mag = np.minimum(np.asarray(mag, dtype=np.float64), levels[-1])
    lv = np.asarray(levels, dtype=np.float64)
    dist = np.abs(mag[..., None] - lv)  # exact: fp32 values and dyadic levels in float64
    cand = dist == dist.min(axis=-1, keepdims=True)
    even = cand & (np.arange(len(lv)) % 2 == 0)
    return np.where(even.any(axis=-1), even.argmax(axis=-1), cand.argmax(axis=-1))


def sr_level_indices(mag: np.ndarray, levels) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) neighbouring level indices of each magnitude (equal when on a level)."""
    mag = np.minimum(np.asarray(mag, dtype=np.float64), levels[-1])
    lv = np.asarray(levels, dtype=np.float64)
    lo = np.searchsorted(lv, mag, side="right") - 1
    hi = np.where(lv[lo] == mag, lo, np.minimum(lo + 1, len(lv) - 1))
    return lo, hi


def fp4_codes_ref(scaled: np.ndarray, levels) -> np.ndarray:
    """RTNE codes of already-scaled fp32 values: sign bit from the input's sign bit."""
    scaled = np.asarray(scaled, dtype=np.float32)
    sign = np.signbit(scaled).astype(np.uint8) << 3
    return sign | nearest_level_index(np.abs(scaled), levels).astype(np.uint8)


def pack_ref(codes: np.ndarray) -> np.ndarray:
    """Two codes per byte along the last axis: element 2i in the low nibble, 2i+1 in the high."""
    codes = np.asarray(codes, dtype=np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def scaled_blocks_ref(x: np.ndarray, fmt: str, block: int, levels) -> np.ndarray:
    """The fp32 values each format hands to the element conversion, blocks along the last axis.

    fp32 scale (e2m1, int4, range-restricted e2m1): x / f32(amax / gmax) (an all-zero block
    divides by 1); nvfp4 / nvint4: x * enc_b with TE's two-level arithmetic (as in ``nvfp4_ref``);
    mxfp4 (OCP floor rule): x * 2^-(floor(log2 amax) - floor(log2 gmax)), exact.
    """
    x = np.asarray(x, dtype=np.float32)
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    gmax = F32(levels[-1])
    if fmt in ("e2m1", "int4"):
        dec = (amax / gmax).astype(np.float32)
        out = xb / np.where(dec > 0, dec, F32(1.0))
    elif fmt in ("nvfp4", "nvint4"):  # the same two-level arithmetic, gmax 6 or 7
        t_amax = F32(amax.max())
        s_enc = F32(F32(448.0 * gmax) / t_amax) if t_amax != 0 else F32(1.0)
        s_enc_over_gmax = F32(s_enc * F32(F32(1.0) / gmax))
        g_dec = F32(F32(1.0) / s_enc)
        sd = np.vectorize(lambda a: e4m3_ref(min(float(F32(F32(a) * s_enc_over_gmax)), 448.0)))(amax).astype(np.float32)
        d = (sd * g_dec).astype(np.float32)
        fmax = np.finfo(np.float32).max
        with np.errstate(divide="ignore", over="ignore"):
            enc = np.minimum(np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), fmax), fmax)
        out = xb * enc.astype(np.float32)
    elif fmt == "mxfp4":
        e = np.vectorize(lambda a: math.frexp(float(a))[1] - 1 if a > 0 else -127)(amax)
        exp = np.clip(e - (math.frexp(float(gmax))[1] - 1), -127, 127)
        out = np.ldexp(xb.astype(np.float64), -exp).astype(np.float32)  # a power of two: exact
    else:
        raise ValueError(fmt)
    return out.astype(np.float32).reshape(x.shape)
