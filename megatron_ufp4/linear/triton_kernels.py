"""Triton kernels: one pass from a high-precision operand to its GEMM-ready FP4 values.

Each program loads one (BR, BK) tile of a 2-D operand blocked along its last dim, and in
registers: rotates it (the reference RHT butterfly of fp4/hadamard.py), takes per-block
amaxes, computes the block scales as fp4/formats.py does, rounds onto the grid (RTNE, or SR
with the counter-based hash of fp4/sr_random.py at each element's global index),
dequantizes and writes the tile once, in the GEMM's input dtype.  ``quantize_tile`` is the
one source for every format; the outer kernels decide only what is loaded and stored (the
column-wise kernel quantizes the transposed tile too, from the same read).

Every operation is one the torch reference performs in the same order with the same
rounding, so the results are its bits: fp32 divisions are ``div_rn`` (Triton's ``/`` is
approximate on NVIDIA GPUs), rounding to an integer is the exact ``(m + 2^23) - 2^23``
(round-half-even for 0 <= m < 2^22), powers of two are built from their bits, and the
launcher disables FMA contraction.  A block holding NaN/Inf decodes to NaN, like the
reference's ``nonfinite="propagate"``; NaN is detected explicitly because a GPU max
reduction drops NaN.

Importing this module imports triton (the launcher in triton_backend.py does it lazily).
Set ``TRITON_INTERPRET=1`` before the import to run the kernels on CPU tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl

# scale kinds (constexpr SCALE)
SCALE_FP32, SCALE_E4M3, SCALE_E8M0_FLOOR, SCALE_E8M0_RCEIL = 0, 1, 2, 3
# grids (constexpr GRID)
GRID_INT4, GRID_E2M1 = 0, 1
# where a per-operand quantity comes from (constexpr *_MODE): one value, one per row, one per column
PER_TENSOR, PER_ROW, PER_COL = 0, 1, 2

_M31 = 0x7FFFFFFF
_FP32_MAX = 3.4028234663852886e38


@triton.jit
def _rint(m):
    """Round-half-even of 0 <= m < 2^22, exactly (no FMA: nothing is multiplied)."""
    return (m + 8388608.0) - 8388608.0


@triton.jit
def _round_to_bf16(q):
    """fp32 -> the nearest bf16 value (ties to even), still in fp32: the cast that follows is then
    exact however the device (or the interpreter, which truncates) converts."""
    b = q.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(q != q, q, r)


@triton.jit
def _pow2(e):
    """2^e as fp32 from its bits, for integer tensors e in [-149, 127]."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    sub = (tl.full(e.shape, 1, tl.int32) << tl.minimum(tl.maximum(e + 149, 0), 31)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, sub)


@triton.jit
def _floor_log2(a):
    """floor(log2 a) for finite a > 0, subnormals included; the low mantissa bits' test of a power of two."""
    bits = a.to(tl.int32, bitcast=True)
    sub = ((bits >> 23) & 0xFF) == 0
    a = tl.where(sub, a * 18446744073709551616.0, a)  # 2^64: exact, lifts a subnormal into the normal range
    bits = a.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - tl.where(sub, 64, 0)
    return e, (bits & 0x7FFFFF) == 0


@triton.jit
def _mix31(x):
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & 0x7FFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x297A2D39) & 0x7FFFFFFF
    return x ^ (x >> 16)


@triton.jit
def sr_uniform(idx, key, WIDE: tl.constexpr):
    """fp4/sr_random.py ``uniform_from_index``.  WIDE: int64 indices and keys, the high-bit round
    for an index >= 2^31.  Otherwise int32 (every index below 2^31): a product wraps modulo 2^32
    on the GPU and the mask keeps its low 31 bits, the int64 product's; half the registers."""
    x = _mix31((idx & 0x7FFFFFFF) ^ key)
    if WIDE:
        hi = idx >> 31
        x = tl.where(hi == 0, x, _mix31(x ^ ((hi * 0x3C6EF35F + key) & 0x7FFFFFFF)))
    return (x >> 7).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def sr_index(ridx_ptr, cidx_ptr, rows, cols, R, K, cstride, key, WIDE: tl.constexpr):
    """(index, key) of each element of a (rows, cols) tile: ridx[r] * cstride + cidx[c], in
    int64 if WIDE, else in int32 (exact: every term is at most the index, below 2^31)."""
    ri = tl.load(ridx_ptr + rows, mask=rows < R, other=0)[:, None]
    ci = tl.load(cidx_ptr + cols, mask=cols < K, other=0)[None, :]
    if not WIDE:
        ri, ci, cstride, key = ri.to(tl.int32), ci.to(tl.int32), cstride.to(tl.int32), key.to(tl.int32)
    return ri * cstride + ci, key


@triton.jit
def rotate_rows(t, signs, BR: tl.constexpr, BK: tl.constexpr, N: tl.constexpr, LOG2N: tl.constexpr,
                RSCALE: tl.constexpr):
    """The reference butterfly on every N-tile of each row of ``t`` (BR, BK): sign flip, LOG2N
    stages of (a + b, a - b) on the pairs (j, j + h), h = 1, 2, 4, ..., one fp32 scale."""
    M: tl.constexpr = BR * BK // N
    t = tl.reshape(t, (M, N)) * signs[None, :]
    for i in tl.static_range(LOG2N):  # h = 1 << i, written inline: a constexpr name cannot be rebound per unrolled step
        t4 = tl.permute(tl.reshape(t, (M, N // (2 << i), 2, 1 << i)), (0, 1, 3, 2))
        a, b = tl.split(t4)
        t = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (M, N))
    return tl.reshape(t * RSCALE, (BR, BK))


@triton.jit
def block_amax(t, BR: tl.constexpr, BK: tl.constexpr, QB: tl.constexpr, RB: tl.constexpr):
    """The tile as (BR/RB, RB, BK/QB, QB) blocks, each block's amax and whether it is finite."""
    tb = tl.reshape(t, (BR // RB, RB, BK // QB, QB))
    amax = tl.max(tl.max(tl.abs(tb), axis=3), axis=1)
    has_nan = tl.max(tl.max((tb != tb).to(tl.int32), axis=3), axis=1) > 0
    return tb, amax, (amax < float("inf")) & (~has_nan)


@triton.jit
def quantize_tile(t, idx, key, bscale, gdec, BR: tl.constexpr, BK: tl.constexpr, QB: tl.constexpr,
                  RB: tl.constexpr, SCALE: tl.constexpr, GRID: tl.constexpr, GMAX: tl.constexpr,
                  EMAX: tl.constexpr, SR: tl.constexpr, WIDE: tl.constexpr):
    """A rotated (BR, BK) fp32 tile blocked RB x QB (RB = 1: 1-D blocks) quantized: returns its
    dequantized fp32 values (BR, BK), its 4-bit codes (BR, BK) int32 and each block's stored
    scale as fp32 (BR/RB, BK/QB): the fp32 scale, the E4M3 value, or the E8M0 biased exponent.
    Unused outputs cost nothing (the compiler drops them).

    idx / key: global SR indices and keys broadcastable to (BR, BK) (SR only; int64 if WIDE).  bscale,
    gdec: NVFP4's ``S_enc / gmax`` and ``1 / S_enc`` (fp32, broadcastable per row / column).
    """
    NRB: tl.constexpr = BR // RB
    NQB: tl.constexpr = BK // QB
    tb, amax, finite = block_amax(t, BR, BK, QB, RB)
    if SCALE == 0:  # fp32: divide by amax / gmax (by 1 for an all-zero block)
        dec = tl.math.div_rn(amax, tl.full(amax.shape, GMAX, tl.float32))
        stored = dec
        div = tl.where(dec > 0, dec, 1.0)
        v = tl.math.div_rn(tb, div[:, None, :, None])
    elif SCALE == 1:  # e4m3 block scale (round-half-even, subnormals from 2^-9) x fp32 tensor scale
        bsc = tl.reshape(tl.broadcast_to(bscale, (BR, BK)), (NRB, RB, NQB, QB))
        gdc = tl.reshape(tl.broadcast_to(gdec, (BR, BK)), (NRB, RB, NQB, QB))
        bsc = tl.max(tl.max(bsc, axis=3), axis=1)  # constant over a block: any element's value
        gdc = tl.max(tl.max(gdc, axis=3), axis=1)
        s = tl.minimum(amax * bsc, 448.0)
        e = tl.maximum(((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        s = _rint(s * _pow2(3 - e)) * _pow2(e - 3)
        stored = s
        dec = s * gdc
        # 1 / dec clamped to the fp32 max; a zero dec (all-zero block) gives the clamp's value directly
        one = tl.full(dec.shape, 1.0, tl.float32)
        enc = tl.where(dec > 0, tl.minimum(tl.math.div_rn(one, tl.where(dec > 0, dec, 1.0)), 3.4028234663852886e38),
                       3.4028234663852886e38)
        v = tb * enc[:, None, :, None]
    else:  # e8m0 power of two: floor (OCP) or rceil
        if SCALE == 2:
            fl, _ = _floor_log2(amax)
            ex = fl - EMAX
        else:
            fl, pow2 = _floor_log2(tl.math.div_rn(amax, tl.full(amax.shape, GMAX, tl.float32)))
            ex = tl.where(pow2, fl, fl + 1)
        ex = tl.minimum(tl.maximum(tl.where(amax > 0, ex, -127), -127), 127)
        dec = _pow2(ex)
        stored = (ex + 127).to(tl.float32)
        v = tb * _pow2(-ex)[:, None, :, None]
    v = tl.minimum(tl.maximum(v, -GMAX), GMAX)
    vbits = v.to(tl.int32, bitcast=True)
    mag = tl.abs(v)
    if GRID == 0:  # the uniform grid: integers
        inv_step = 1.0
        step = 1.0
    else:  # e2m1: spacing 0.5 below 2, 1 below 4, 2 above (even multiples are even codes)
        inv_step = tl.where(mag < 2.0, 2.0, tl.where(mag < 4.0, 1.0, 0.5))
        step = tl.where(mag < 2.0, 0.5, tl.where(mag < 4.0, 1.0, 2.0))
    m = mag * inv_step  # exact: a power of two
    if SR:
        u = tl.reshape(sr_uniform(idx, key, WIDE), (NRB, RB, NQB, QB))
        lo = tl.floor(m)
        r = lo + (u < m - lo).to(tl.float32)
    else:
        r = _rint(m)
    qm = r * step
    q = (qm.to(tl.int32, bitcast=True) | (vbits & -2147483648)).to(tl.float32, bitcast=True)  # v's sign, -0 kept
    if GRID == 0:
        code = qm.to(tl.int32)
    else:  # e2m1 levels 0, .5, 1, 1.5 | 2, 3 | 4, 6 -> codes 0..3 | 4, 5 | 6, 7
        code = tl.where(qm < 2.0, qm * 2.0, tl.where(qm < 4.0, qm + 2.0, qm * 0.5 + 4.0)).to(tl.int32)
    code = code | tl.where(vbits < 0, 8, 0)  # the sign bit of the value: -0 is code 8
    dec = tl.where(finite, dec, float("nan"))
    # a non-finite block stores a NaN scale (E8M0: its NaN byte 255), so packed storage keeps the NaN too
    stored = tl.where(finite, stored, 255.0 if SCALE >= 2 else float("nan"))
    return tl.reshape(q * dec[:, None, :, None], (BR, BK)), tl.reshape(code, (BR, BK)), stored


@triton.jit
def _load_tile(x_ptr, rows, cols, R, K, stride_r, stride_k):
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    return tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _per(ptr, rows, cols, R, K, MODE: tl.constexpr):
    """A per-tensor / per-row / per-column quantity, shaped to broadcast against a (rows, cols) tile."""
    if MODE == 0:
        return tl.load(ptr)
    elif MODE == 1:
        return tl.load(ptr + rows, mask=rows < R, other=0)[:, None]
    else:
        return tl.load(ptr + cols, mask=cols < K, other=0)[None, :]


@triton.jit
def quantize_rows_kernel(x_ptr, out_ptr, R, K, stride_r, stride_k, signs_ptr,
                         key_ptr, ridx_ptr, cidx_ptr, cstride_ptr, bscale_ptr, gdec_ptr,
                         BR: tl.constexpr, BK: tl.constexpr, QB: tl.constexpr, RB: tl.constexpr,
                         SCALE: tl.constexpr, GRID: tl.constexpr, GMAX: tl.constexpr, EMAX: tl.constexpr,
                         SR: tl.constexpr, WIDE: tl.constexpr, N: tl.constexpr, LOG2N: tl.constexpr,
                         RSCALE: tl.constexpr, KEY_MODE: tl.constexpr, STRIDE_MODE: tl.constexpr,
                         PAR_MODE: tl.constexpr, OUT_BF16: tl.constexpr, codes_ptr=None, scales_ptr=None,
                         PACKED: tl.constexpr = False, VALUES: tl.constexpr = True):
    """out[R, K] = the dequantized FP4 values of x[R, K] blocked along K (row-major output);
    PACKED: also the packed codes and the blocks' scales; VALUES=False: only those.

    SR index of element (r, c): ridx[r] * cstride + cidx[c] (cstride one value or per column);
    key and the NVFP4 factors: one value, per row or per column (a grouped operand's groups).
    """
    # int64 offsets: an operand (or a transposed view's strides) may span more than 2^31 elements
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    t = _load_tile(x_ptr, rows, cols, R, K, stride_r, stride_k)
    if N > 1:
        t = rotate_rows(t, tl.load(signs_ptr + tl.arange(0, N)), BR, BK, N, LOG2N, RSCALE)
    idx = 0
    key = 0
    if SR:
        idx, key = sr_index(ridx_ptr, cidx_ptr, rows, cols, R, K, _per(cstride_ptr, rows, cols, R, K, STRIDE_MODE),
                            _per(key_ptr, rows, cols, R, K, KEY_MODE), WIDE)
    bscale = 0.0
    gdec = 0.0
    if SCALE == 1:
        bscale = _per(bscale_ptr, rows, cols, R, K, PAR_MODE)
        gdec = _per(gdec_ptr, rows, cols, R, K, PAR_MODE)
    q, code, stored = quantize_tile(t, idx, key, bscale, gdec, BR, BK, QB, RB, SCALE, GRID, GMAX, EMAX, SR, WIDE)
    if OUT_BF16:
        q = _round_to_bf16(q).to(tl.bfloat16)
    if VALUES:
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], q, mask=(rows[:, None] < R) & (cols[None, :] < K))
    if PACKED:  # two codes per byte (element 2i low nibble) and the blocks' scales
        lo, hi = tl.split(tl.reshape(code, (BR, BK // 2, 2)))
        pcols = tl.program_id(1).to(tl.int64) * (BK // 2) + tl.arange(0, BK // 2)
        tl.store(codes_ptr + rows[:, None] * (K // 2) + pcols[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=(rows[:, None] < R) & (pcols[None, :] < K // 2))
        srows = tl.program_id(0).to(tl.int64) * (BR // RB) + tl.arange(0, BR // RB)
        scols = tl.program_id(1).to(tl.int64) * (BK // QB) + tl.arange(0, BK // QB)
        tl.store(scales_ptr + srows[:, None] * (K // QB) + scols[None, :], stored,
                 mask=(srows[:, None] < R // RB) & (scols[None, :] < K // QB))


@triton.jit
def tensor_amax_kernel(x_ptr, part_ptr, R, K, stride_r, stride_k, signs_ptr,
                       BR: tl.constexpr, BK: tl.constexpr, QB: tl.constexpr, RB: tl.constexpr,
                       N: tl.constexpr, LOG2N: tl.constexpr, RSCALE: tl.constexpr):
    """NVFP4's pre-pass: each program's max over its finite blocks' amaxes (rotated first), into
    ``part[program]``; the host takes the max of the parts (exact, in any order)."""
    # int64 offsets: an operand (or a transposed view's strides) may span more than 2^31 elements
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    t = _load_tile(x_ptr, rows, cols, R, K, stride_r, stride_k)
    if N > 1:
        t = rotate_rows(t, tl.load(signs_ptr + tl.arange(0, N)), BR, BK, N, LOG2N, RSCALE)
    _, amax, finite = block_amax(t, BR, BK, QB, RB)
    part = tl.max(tl.max(tl.where(finite, amax, 0.0), axis=1), axis=0)
    tl.store(part_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), part)


@triton.jit
def _pair_operand(t, rows, cols, R, K, signs_ptr, key_ptr, ridx_ptr, cidx_ptr, cstride_ptr, bscale_ptr, gdec_ptr,
                  BR: tl.constexpr, BK: tl.constexpr, QB: tl.constexpr, RB: tl.constexpr, SCALE: tl.constexpr,
                  GRID: tl.constexpr, GMAX: tl.constexpr, EMAX: tl.constexpr, SR: tl.constexpr, WIDE: tl.constexpr,
                  N: tl.constexpr, LOG2N: tl.constexpr, RSCALE: tl.constexpr, OUT_BF16: tl.constexpr):
    """One operand of the pair kernel: the (BR, BK) tile ``t`` holds rows ``rows`` (< R) and columns
    ``cols`` (< K) of that operand, blocked along its columns; returns the values to store."""
    if N > 1:
        t = rotate_rows(t, tl.load(signs_ptr + tl.arange(0, N)), BR, BK, N, LOG2N, RSCALE)
    idx = 0
    key = 0
    if SR:
        idx, key = sr_index(ridx_ptr, cidx_ptr, rows, cols, R, K, tl.load(cstride_ptr), tl.load(key_ptr), WIDE)
    q, _, _ = quantize_tile(t, idx, key, tl.load(bscale_ptr), tl.load(gdec_ptr),
                            BR, BK, QB, RB, SCALE, GRID, GMAX, EMAX, SR, WIDE)
    if OUT_BF16:
        q = _round_to_bf16(q).to(tl.bfloat16)
    return q


@triton.jit
def quantize_rowcol_kernel(x_ptr, row_ptr, col_ptr, R, K, stride_r, stride_k,
                           signs1_ptr, key1_ptr, ridx1_ptr, cidx1_ptr, cstride1_ptr, bscale1_ptr, gdec1_ptr,
                           signs2_ptr, key2_ptr, ridx2_ptr, cidx2_ptr, cstride2_ptr, bscale2_ptr, gdec2_ptr,
                           BR: tl.constexpr, BK: tl.constexpr,
                           QB1: tl.constexpr, RB1: tl.constexpr, SCALE1: tl.constexpr, GRID1: tl.constexpr,
                           GMAX1: tl.constexpr, EMAX1: tl.constexpr, SR1: tl.constexpr, WIDE1: tl.constexpr,
                           N1: tl.constexpr,
                           LOG2N1: tl.constexpr, RSCALE1: tl.constexpr,
                           QB2: tl.constexpr, RB2: tl.constexpr, SCALE2: tl.constexpr, GRID2: tl.constexpr,
                           GMAX2: tl.constexpr, EMAX2: tl.constexpr, SR2: tl.constexpr, WIDE2: tl.constexpr,
                           N2: tl.constexpr,
                           LOG2N2: tl.constexpr, RSCALE2: tl.constexpr, OUT_BF16: tl.constexpr):
    """Both GEMM-ready forms of one tensor from a single read, as Transformer Engine's
    quantize-transpose does: row[R, K] = x blocked along K (operand 1) and col[K, R] = x^T
    blocked along R (operand 2, e.g. dY for Dgrad and dY^T for Wgrad), each with its own
    format, RHT, rounding, SR key / indices and NVFP4 factors (one value each)."""
    # int64 offsets: an operand (or a transposed view's strides) may span more than 2^31 elements
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    t = _load_tile(x_ptr, rows, cols, R, K, stride_r, stride_k)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    q1 = _pair_operand(t, rows, cols, R, K, signs1_ptr, key1_ptr, ridx1_ptr, cidx1_ptr, cstride1_ptr, bscale1_ptr,
                       gdec1_ptr, BR, BK, QB1, RB1, SCALE1, GRID1, GMAX1, EMAX1, SR1, WIDE1, N1, LOG2N1, RSCALE1,
                       OUT_BF16)
    tl.store(row_ptr + rows[:, None] * K + cols[None, :], q1, mask=mask)
    # operand 2: the transposed tile, blocked along the rows of x
    q2 = _pair_operand(tl.trans(t), cols, rows, K, R, signs2_ptr, key2_ptr, ridx2_ptr, cidx2_ptr, cstride2_ptr,
                       bscale2_ptr, gdec2_ptr, BK, BR, QB2, RB2, SCALE2, GRID2, GMAX2, EMAX2, SR2, WIDE2, N2, LOG2N2,
                       RSCALE2, OUT_BF16)
    tl.store(col_ptr + cols[:, None] * R + rows[None, :], q2, mask=tl.trans(mask))
