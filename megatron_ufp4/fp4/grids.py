"""4-bit element grids and the rounding of scaled values onto them.

A grid is the set of non-negative magnitudes a 4-bit code can take; the sign is a
separate bit, so a code is ``sign << 3 | magnitude_index`` (the sign bit of the value, so
-0 is code 8).  Rounding happens in the
*value* domain (scaled values in, grid values out) so that the fake-quant GEMM path
and the packed-storage path share one rounding rule; codes are derived afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

ROUNDINGS = ("rtne", "sr")


@dataclass(frozen=True)
class Grid:
    name: str
    levels: tuple[float, ...]  # ascending magnitudes; index == magnitude code

    @property
    def max(self) -> float:
        return self.levels[-1]

    @property
    def uniform(self) -> bool:
        return all(lv == i for i, lv in enumerate(self.levels))

    def per_level_bias(self) -> list[float]:
        """(2 q_i - q_{i-1} - q_{i+1}) / 4 at interior levels (locally uniform density)."""
        q = self.levels
        return [float("nan")] + [(2 * q[i] - q[i - 1] - q[i + 1]) / 4 for i in range(1, len(q) - 1)] + [float("nan")]

    # -- tables on a device (cached: they are tiny and used on every call) --------------
    def levels_tensor(self, device) -> torch.Tensor:
        return _levels(self.levels, str(device))

    def signed_lut(self, device) -> torch.Tensor:
        """16-entry table: code -> signed value (codes 8..15 are negative)."""
        return _signed_lut(self.levels, str(device))

    # -- rounding ---------------------------------------------------------------------
    def round_(self, v: torch.Tensor, rounding: str = "rtne", u: torch.Tensor | None = None) -> torch.Tensor:
        """Round scaled fp32 values onto the signed grid, saturating at ±max.

        Works in place on ``v`` (a fresh fp32 tensor owned by the caller) and returns it.
        RTNE sends ties to the even magnitude code, as hardware converters do.  SR rounds
        up with probability equal to the fractional position between the two neighbouring
        levels (``u``: uniform [0, 1) draws, one per element), so E[SR(v)] = v in range.
        """
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
        v.clamp_(-self.max, self.max)
        step = self._step(v)
        if step is None:
            return self._round_by_table(v, rounding, u)
        if isinstance(step, float):  # the uniform grid: no per-element step to divide by
            if rounding == "rtne":
                return v.round_()
            mag = v.abs()
            lo = mag.floor()
            return lo.add_((u < mag.sub_(lo)).to(v.dtype)).copysign_(v)
        if rounding == "rtne":  # within a step region, round-half-even of v/step is even-code rounding
            return v.div_(step).round_().mul_(step)
        lo = v.abs().div_(step).floor_()
        up = (u < v.abs().div_(step).sub_(lo)).to(v.dtype)
        return lo.add_(up).mul_(step).copysign_(v)

    def _step(self, v: torch.Tensor) -> torch.Tensor | float | None:
        """Local grid spacing at each value, for grids that are piecewise uniform.

        INT4: 1 everywhere.  E2M1 (and its range-restricted variants): 0.5 below 2, 1 below
        4, 2 above; codes inside each region are affine in value/step with an even offset
        (0, +2, +4), so even multiples of the step are even codes, and ties on a region
        boundary (1.75, 3.5) land on the upper, even-coded level.
        """
        if self.uniform:
            return 1.0
        if self.levels == E2M1_LEVELS[: len(self.levels)] and len(self.levels) >= 5:
            mag = v.abs()
            return torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
        return None

    def _round_by_table(self, v, rounding, u):
        """Generic path for any ascending level set (binary search on the levels)."""
        mag = v.abs()
        lv = self.levels_tensor(v.device)
        if rounding == "rtne":
            mids = _mids(self.levels, str(v.device))
            idx = torch.bucketize(mag, mids, right=True, out_int32=True)  # ties round up here ...
            tie = (idx % 2 == 1) & (mag == mids[(idx - 1).clamp_(min=0).long()])
            idx = idx - tie.to(idx.dtype)  # ... and back down when the lower code is the even one
            return lv[idx.long()].copysign_(v)
        lo_idx = (torch.bucketize(mag, lv, right=True) - 1).clamp_(0, len(self.levels) - 2)
        lo, hi = lv[lo_idx], lv[lo_idx + 1]
        return torch.where(u < (mag - lo) / (hi - lo), hi, lo).copysign_(v)

    # -- codes ------------------------------------------------------------------------
    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Grid values (signed) -> uint8 codes, the sign bit copied from the value's sign bit.

        As in hardware / Transformer Engine / torchao FP4 conversion, a negative value that
        rounded to magnitude 0 (rounding keeps its sign, so it is -0.0), and -0.0 itself,
        is code 8 ("-0"); it decodes to -0.0.  NaN (blocks kept by nonfinite="propagate",
        which decode to NaN through their scale) is not given a sign here.
        """
        mag = q.abs()
        idx = torch.bucketize(mag, self.levels_tensor(q.device), out_int32=True).to(torch.uint8)
        neg = (torch.signbit(q) & ~torch.isnan(q)).to(torch.uint8) << 3
        return idx | neg

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.signed_lut(codes.device)[codes.long()]


@lru_cache(maxsize=None)
def _levels(levels: tuple[float, ...], device: str) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def _mids(levels: tuple[float, ...], device: str) -> torch.Tensor:
    lv = torch.tensor(levels, dtype=torch.float32)
    return ((lv[:-1] + lv[1:]) / 2).to(device)


@lru_cache(maxsize=None)
def _signed_lut(levels: tuple[float, ...], device: str) -> torch.Tensor:
    lv = list(levels) + [0.0] * (8 - len(levels))
    return torch.tensor(lv + [-x for x in lv], dtype=torch.float32, device=device)


E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1 = Grid("e2m1", E2M1_LEVELS)
INT4 = Grid("int4", tuple(float(i) for i in range(8)))


def get_grid(name: str, max_level: float | None = None) -> Grid:
    """``e2m1`` (optionally range-restricted to levels <= max_level) or ``int4``."""
    if name == "int4":
        if max_level is not None:
            raise ValueError("max_level applies only to the e2m1 grid, not int4")
        return INT4
    if name == "e2m1":
        if max_level is None or max_level == 6:
            return E2M1
        if max_level not in (2, 3, 4):
            raise ValueError(f"max_level must be 2, 3 or 4 (got {max_level})")
        return Grid(f"e2m1_max{int(max_level)}", tuple(x for x in E2M1_LEVELS if x <= max_level))
    raise ValueError(f"unknown grid {name!r}; expected 'e2m1' or 'int4'")
