"""Named 4-bit formats: a grid, a block shape and a block-scale kind.

Adding a format means adding one entry to ``FORMATS`` (and, for a new scale kind, one
branch in ``block_scales``).  Scale kinds:

* ``fp32`` — the paper's recipes: one plain FP32 scale per block, ``amax / grid_max``;
  elements are divided by it.
* ``e4m3`` — NVFP4 two-level scaling, Transformer Engine's arithmetic operation for
  operation (on E2M1, gmax 6: ``nvfp4``; on the uniform grid, gmax 7: ``nvint4``):
  ``S_enc = 448*gmax/amax_tensor`` (→1 when amax or S_enc is 0),
  ``S_dec_b = e4m3(min(amax_b * (S_enc * (1/gmax)), 448))`` (one rounding, no lower
  clamp), encode multiplier ``1 / (f32(S_dec_b) * (1/S_enc))``.
* ``e8m0`` — OCP MX power-of-two scales.  ``scale_mode="floor"`` is the OCP rule
  ``2^(floor(log2 amax) - floor(log2 gmax))`` (can saturate the top of a block);
  ``"rceil"`` is ``2^ceil(log2(amax/gmax))`` (never saturates).

Specification: docs/formats.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
import torch

from .grids import Grid, get_grid

E4M3_MAX = 448.0
FP32_MAX = torch.finfo(torch.float32).max
SCALE_KINDS = ("fp32", "e4m3", "e8m0")
BLOCK_SIZES = (16, 32)
E8M0_MODES = ("floor", "rceil")


@dataclass(frozen=True)
class FP4Format:
    name: str
    grid: str  # "e2m1" | "int4"
    scale: str  # one of SCALE_KINDS
    block: int = 16
    block_2d: bool = False  # square block x block tiles (weights: W and W^T quantize alike)
    max_level: float | None = None  # range-restricted e2m1
    scale_mode: str = "floor"  # e8m0 only

    def __post_init__(self):
        get_grid(self.grid, self.max_level)  # validates grid + max_level
        if self.scale not in SCALE_KINDS:
            raise ValueError(f"format {self.name}: unknown scale {self.scale!r}; expected one of {SCALE_KINDS}")
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"format {self.name}: block must be one of {BLOCK_SIZES} (got {self.block})")
        if self.scale_mode not in E8M0_MODES:
            raise ValueError(f"format {self.name}: scale_mode must be one of {E8M0_MODES} (got {self.scale_mode!r})")

    @property
    def grid_obj(self) -> Grid:
        return get_grid(self.grid, self.max_level)

    def describe(self) -> str:
        blk = f"{self.block}x{self.block}" if self.block_2d else f"1x{self.block}"
        grid = self.grid_obj.name
        extra = f" {self.scale_mode}" if self.scale == "e8m0" else ("+fp32 tensor" if self.scale == "e4m3" else "")
        return f"{grid} {blk} {self.scale}{extra}"


FORMATS: dict[str, FP4Format] = {
    "e2m1": FP4Format("e2m1", grid="e2m1", scale="fp32", block=16),
    "int4": FP4Format("int4", grid="int4", scale="fp32", block=16),
    "nvfp4": FP4Format("nvfp4", grid="e2m1", scale="e4m3", block=16),
    # the uniform grid (integer magnitudes 0..7) with NVFP4's two-level scales: S_enc = 448*7/amax
    "nvint4": FP4Format("nvint4", grid="int4", scale="e4m3", block=16),
    "mxfp4": FP4Format("mxfp4", grid="e2m1", scale="e8m0", block=32),
}


def make_format(fmt: str | FP4Format, **overrides) -> FP4Format:
    """A format by name (or as given), with option overrides (None means 'keep')."""
    if isinstance(fmt, FP4Format):
        base = fmt
    elif fmt in FORMATS:
        base = FORMATS[fmt]
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **overrides) if overrides else base


def nvfp4_tensor_encode_scale(tensor_amax: torch.Tensor, gmax: float) -> torch.Tensor:
    amax = tensor_amax.float()
    # a true fp32 division (a Python scalar over a tensor would be reciprocal-then-multiply)
    s_enc = torch.div(torch.full_like(amax, E4M3_MAX * gmax), amax).clamp(max=FP32_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def nvfp4_tensor_factors(tensor_amax: torch.Tensor, gmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4's two per-tensor fp32 factors: the block-scale multiplier ``S_enc * (1/gmax)`` and the
    second-level decode factor ``1 / S_enc`` (one definition for every backend)."""
    s_enc = nvfp4_tensor_encode_scale(tensor_amax, gmax)
    return s_enc * (1.0 / torch.tensor(gmax)), 1.0 / s_enc


def _divide(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t / value`` correctly rounded on every device: CUDA computes a tensor divided by a
    Python scalar as ``t * (1 / value)`` (one rounding more), a tensor divisor it divides."""
    return torch.div(t, torch.full_like(t, value))


def block_scales(amax: torch.Tensor, fmt: FP4Format, tensor_amax: torch.Tensor | None):
    """Per-block scales from per-block amax.

    Returns (stored, decode, encode, tensor_scale): ``encode`` is the fp32 multiplier
    that maps elements onto the grid, or None when elements are *divided* by ``decode``
    (the plain FP32 scale of the paper).
    """
    gmax = fmt.grid_obj.max
    if fmt.scale == "fp32":
        dec = _divide(amax, gmax)
        return dec, dec, None, None
    if fmt.scale == "e4m3":
        block_mult, g_dec = nvfp4_tensor_factors(tensor_amax, gmax)
        s_dec_b = (amax * block_mult).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        dec = s_dec_b.float() * g_dec
        enc = (1.0 / dec).clamp(max=FP32_MAX)
        return s_dec_b, dec, enc, g_dec
    # e8m0: exact exponent arithmetic through frexp (m in [0.5, 1): floor(log2 a) = e - 1)
    emax = math.frexp(gmax)[1] - 1
    if fmt.scale_mode == "floor":
        _, e = torch.frexp(amax)
        exp = e - 1 - emax
    else:
        m, e = torch.frexp(_divide(amax, gmax))
        exp = torch.where(m == 0.5, e - 1, e)
    exp = torch.where(amax > 0, exp, -127).clamp_(-127, 127)
    stored = (exp + 127).to(torch.uint8)  # biased exponent; see storage_dtype_view
    dec = torch.ldexp(torch.ones_like(amax), exp)
    return stored, dec, torch.ldexp(torch.ones_like(amax), -exp), None


def storage_dtype_view(stored: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    """E8M0 scales are computed as biased-exponent bytes; present them as float8_e8m0fnu."""
    return stored.view(torch.float8_e8m0fnu) if fmt.scale == "e8m0" else stored


def scale_values(xb: torch.Tensor, dec: torch.Tensor, enc: torch.Tensor | None) -> torch.Tensor:
    """Map blocked elements onto the grid's range (fresh fp32 tensor)."""
    if enc is None:  # an all-zero block has scale 0: divide by 1 instead (its elements are 0)
        return xb / torch.where(dec > 0, dec, 1.0)
    return xb * enc
