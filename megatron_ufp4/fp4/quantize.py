"""The one quantizer: block scaling + optional RHT + RTNE/SR rounding onto a 4-bit grid.

``quantize`` returns real storage (4-bit codes, block scales, NVFP4 tensor scale);
``fake_quantize`` returns the dequantized values directly, for emulated GEMMs: bitwise
equal to ``quantize(...).dequantize(rotated=True)``, signed zeros included.

Codes are ``sign << 3 | magnitude_index`` with the sign bit taken from the scaled value's
fp32 sign bit, as the hardware / Transformer Engine / torchao conversion does: a negative
value that rounds to zero (and -0.0) is stored as code 8 ("-0"), so codes and packed bytes
match those converters bit for bit.  Code 8 decodes to -0.0, as fake_quantize keeps it.

Specification: docs/formats.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .compiled import compile_scope
from .formats import FP4Format, block_scales, make_format, scale_values, storage_dtype_view
from .grids import ROUNDINGS
from .hadamard import RHT, rotate_tiles
from .sr_random import SRIndex, draw_key, element_index, needs_wide_index, uniform_from_index


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8, one code per element, same shape as the source tensor
    scales: torch.Tensor  # per-block scales in storage dtype (fp32 / float8_e4m3fn / float8_e8m0fnu)
    tensor_scale: torch.Tensor | None  # NVFP4 fp32 second-level decode factor (1/S_enc), else None
    fmt: FP4Format
    axis: int
    rht: RHT | None
    decode_scales: torch.Tensor  # fp32 per-block multipliers (scales x tensor_scale)
    orig_dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def packed(self) -> torch.Tensor:
        """Two codes per byte along the last dim: element 2i in the low nibble, 2i+1 in the high."""
        return pack_codes(self.codes)

    def dequantize(self, rotated: bool = False) -> torch.Tensor:
        """fp32 values; in the original basis unless ``rotated`` (the basis the GEMM uses)."""
        lut = self.fmt.grid_obj.signed_lut(self.codes.device)
        moved = self.codes.movedim(self.axis, -1)
        vals = _blocked(lut[moved.long()], self.fmt)
        out = (vals * self.decode_scales).reshape(moved.shape)
        if self.rht is not None and not rotated:
            out = self.rht.unrotate(out)
        return out.movedim(-1, self.axis)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    if codes.shape[-1] % 2:
        raise ValueError(f"packing needs an even last dimension (got {codes.shape[-1]})")
    c = codes.contiguous()
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _blocked(moved: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    b = fmt.block
    if fmt.block_2d:
        r, c = moved.shape
        return moved.reshape(r // b, b, c // b, b)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // b, b)


def check_quantize_args(x: torch.Tensor, fmt: FP4Format, axis: int, rounding: str, rht: RHT | None,
                        nonfinite: str) -> int:
    """One-line ValueErrors for arguments no quantizer can take; returns the normalised axis."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"quantize expects a floating-point tensor (got {getattr(x, 'dtype', type(x).__name__)})")
    if x.dim() == 0:
        raise ValueError("quantize expects at least a 1-D tensor")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-D tensor")
    axis %= x.dim()
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f"nonfinite must be 'raise' or 'propagate' (got {nonfinite!r})")
    n, b = x.shape[axis], fmt.block
    if n % b:
        raise ValueError(f"{fmt.name}: axis {axis} has size {n}, not a multiple of the block size {b}")
    if fmt.block_2d:
        if x.dim() != 2:
            raise ValueError(f"{fmt.name}: 2D {b}x{b} blocks need a 2-D tensor (got shape {tuple(x.shape)})")
        if x.shape[1 - axis] % b:
            raise ValueError(f"{fmt.name}: shape {tuple(x.shape)} is not a multiple of the {b}x{b} block")
    if rht is not None and n % rht.size:
        raise ValueError(f"RHT of size {rht.size} needs axis {axis} (size {n}) to be a multiple of {rht.size}")
    return axis


def _rotate(xm: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """fp32 values in the basis that is quantized (tiles of the last dim rotated by the RHT
    whose sign vector is ``signs``; the butterfly of fp4/hadamard.py)."""
    return rotate_tiles(xm, signs) if signs is not None else xm.float()


def _block_amax(xb: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    return xb.abs().amax(dim=(1, 3) if fmt.block_2d else (-1,), keepdim=True)


def _finite_amax(block_amax: torch.Tensor) -> torch.Tensor:
    """Tensor amax over the finite blocks: one NaN block must not poison every other block's scale."""
    return torch.where(torch.isfinite(block_amax), block_amax, 0.0).amax()


def tensor_amax(x: torch.Tensor, fmt: str | FP4Format, rht: RHT | None = None, **fmt_options) -> torch.Tensor:
    """The fp32 tensor amax a two-level-scaled format (NVFP4) uses for ``x`` blocked along its
    last dim, computed exactly as ``quantize`` computes it: after the RHT, over finite blocks.
    Sharded operands all-reduce(max) this value and pass it back as ``tensor_amax``."""
    fmt = make_format(fmt, **fmt_options)
    xm = x.detach().contiguous()
    rot = rht.signs_on(x.device) if rht is not None else None
    return _finite_amax(_block_amax(_blocked(_rotate(xm, rot), fmt), fmt))


def _blocks_core(xm, fmt: FP4Format, rounding: str, rot, sr_key, sr_index, tensor_amax, dequantize: bool,
                 wide: bool = True):
    """Pure tensor math shared by every path (and compiled whole by the fused backend).

    xm: the input with the blocked axis last; rot: the RHT's sign vector or None; sr_key (int64
    tensor: 0-d, or one key per row / column of a grouped operand) and sr_index (an
    ``SRIndex``, or a grouped operand's precomputed int64 global indices, whose ``wide`` the
    caller decides): where the SR draws come from (see sr_random).  tensor_amax: 0-d, or
    broadcastable to the block amaxes (one per group of a grouped operand).
    Returns (grid values or dequantized values, blocked; stored scales; fp32 decode
    multipliers; tensor scale; whether every block was finite).
    """
    xb = _blocked(_rotate(xm, rot), fmt)
    amax = _block_amax(xb, fmt)
    finite = torch.isfinite(amax)
    if fmt.scale == "e4m3" and tensor_amax is None:
        tensor_amax = _finite_amax(amax)
    stored, dec, enc, tscale = block_scales(amax, fmt, tensor_amax)
    u = None
    if rounding == "sr":
        if torch.is_tensor(sr_index):
            idx = sr_index
        else:
            wide = needs_wide_index(xm.shape, sr_index)
            # int32 hashing relies on products wrapping modulo 2^32.  Fused into one compiled C++
            # loop, that wrap is undefined behaviour: the compiler drops a mask it proves redundant
            # and the scalar build (ATEN_CPU_CAPABILITY=default) draws other numbers.  Compiled
            # code hashes in int64 (no product overflows; the same draws, sr_random's docstring).
            narrow = not wide and not torch.compiler.is_compiling()
            idx = element_index(xm.shape, sr_index, xm.device, torch.int32 if narrow else torch.int64)
        u = _blocked(uniform_from_index(idx, sr_key, wide), fmt)
    q = fmt.grid_obj.round_(scale_values(xb, dec, enc), rounding, u)
    dec = torch.where(finite, dec, float("nan"))  # a block holding NaN/Inf decodes to NaN, never a number
    if dequantize:
        q = q.mul_(dec)
    return q, stored, dec, tscale, finite.all()


_compiled_core = _compiled_rotate = None


def _run_core(fused: bool, *args):
    """The eager core, or the same function through torch.compile: one fused C++/Triton
    kernel per (format, rounding, RHT) instead of ~10 memory passes; bitwise identical.
    Compiled within ``compiled.compile_scope`` (graph limits; a cache key per CPU target)."""
    global _compiled_core, _compiled_rotate
    if not fused:
        return _blocks_core(*args)
    if _compiled_core is None:
        _compiled_core = torch.compile(_blocks_core, dynamic=True)
        _compiled_rotate = torch.compile(rotate_tiles, dynamic=True)
    with compile_scope():
        xm, fmt, rounding, rot, *rest = args
        if rot is not None:  # rotated in a kernel of its own: fused into the block amax and the
            # scaling, inductor would recompute the butterfly for each (measured 2-3x slower)
            xm, rot = _compiled_rotate(xm, rot), None
        return _compiled_core(xm, fmt, rounding, rot, *rest)


def _quantize_values(x, fmt, axis, rounding, rht, generator, tensor_amax, nonfinite, dequantize=False, fused=False,
                     sr_index=None, sr_key=None):
    moved = x.detach().movedim(axis, -1).contiguous()  # quantization is not differentiated through
    key = None
    if rounding == "sr":
        key = torch.tensor(draw_key(generator) if sr_key is None else sr_key, dtype=torch.int64, device=x.device)
    rot = rht.signs_on(x.device) if rht is not None else None
    q, stored, dec, tscale, all_finite = _run_core(fused, moved, fmt, rounding, rot, key, sr_index, tensor_amax,
                                                   dequantize)
    if nonfinite == "raise" and not bool(all_finite):
        raise ValueError(f"{fmt.name}: tensor of shape {tuple(x.shape)} contains NaN or Inf; refusing to quantize")
    return q, stored, dec, tscale, moved.shape


def _operand_stats(x, q, dec, fmt, rht, axis) -> dict:
    """Telemetry for one quantized operand: amax, attenuation alpha, NMSE, clipped fraction."""
    src = (rht.rotate(x.movedim(axis, -1)) if rht is not None else x.movedim(axis, -1).float()).reshape(q.shape)
    deq = q
    energy = src.double().pow(2).sum()
    inner = (deq.double() * src.double()).sum()
    err = (deq.double() - src.double()).pow(2).sum()
    clipped = (src.abs() > fmt.grid_obj.max * dec * (1 + 2 ** -20)) & (dec > 0)
    return {"amax": float(src.abs().max()), "alpha": float(inner / energy) if energy > 0 else 1.0,
            "nmse": float(err / energy) if energy > 0 else 0.0, "saturated": float(clipped.float().mean()),
            "zeroed": float(((deq == 0) & (src != 0)).float().mean())}


def _scale_layout(s: torch.Tensor, fmt: FP4Format, axis: int) -> torch.Tensor:
    s = s.squeeze(3).squeeze(1) if fmt.block_2d else s.squeeze(-1)
    return s.movedim(-1, axis)


def quantize(x: torch.Tensor, fmt: str | FP4Format, axis: int = -1, rounding: str = "rtne",
             rht: RHT | None = None, generator: torch.Generator | None = None, *,
             tensor_amax: torch.Tensor | None = None, nonfinite: str = "raise",
             sr_index: SRIndex | None = None, sr_key: int | None = None, **fmt_options) -> QuantizedTensor:
    """Quantize ``x`` in blocks along ``axis``.

    fmt: "e2m1" | "int4" | "nvfp4" | "mxfp4" or an FP4Format; ``fmt_options`` override its
    fields (block, block_2d, max_level, scale_mode, scale).  rounding: "rtne" | "sr" (SR
    draws from ``generator``).  rht: rotate blocks along ``axis`` first.  tensor_amax: a
    precomputed NVFP4 tensor amax (e.g. all-reduced across tensor-parallel ranks).
    sr_index: where this tensor (as rows x blocked axis) sits in a larger logical tensor, so
    a shard's SR draws equal the unsplit tensor's (one key is drawn from ``generator``, or
    ``sr_key`` is used as given).
    nonfinite: "raise" (default) or "propagate" (blocks with NaN/Inf decode to NaN).
    """
    fmt = make_format(fmt, **fmt_options)
    axis = check_quantize_args(x, fmt, axis, rounding, rht, nonfinite)
    q, stored, dec, tscale, mshape = _quantize_values(x, fmt, axis, rounding, rht, generator, tensor_amax, nonfinite,
                                                      sr_index=sr_index, sr_key=sr_key)
    codes = fmt.grid_obj.encode(q).reshape(mshape).movedim(-1, axis)
    scales = _scale_layout(storage_dtype_view(stored, fmt), fmt, axis)
    return QuantizedTensor(codes, scales, tscale, fmt, axis, rht, dec, x.dtype)


def fake_quantize(x: torch.Tensor, fmt: str | FP4Format, axis: int = -1, rounding: str = "rtne",
                  rht: RHT | None = None, generator: torch.Generator | None = None, *,
                  tensor_amax: torch.Tensor | None = None, nonfinite: str = "raise",
                  stats: dict | None = None, fused: bool = False, sr_index: SRIndex | None = None,
                  sr_key: int | None = None, **fmt_options) -> torch.Tensor:
    """Dequantized fp32 values in the rotated basis (what an FP4 GEMM multiplies).

    If ``stats`` is a dict it is filled with telemetry (see ``_operand_stats``).
    fused: run the torch.compile'd core (same bits, fewer memory passes).
    """
    fmt = make_format(fmt, **fmt_options)
    axis = check_quantize_args(x, fmt, axis, rounding, rht, nonfinite)
    q, _, dec, _, mshape = _quantize_values(x, fmt, axis, rounding, rht, generator, tensor_amax, nonfinite, True, fused,
                                            sr_index, sr_key)
    if stats is not None:
        stats.update(_operand_stats(x, q, dec, fmt, rht, axis))
    return q.reshape(mshape).movedim(-1, axis)
