"""Grouped operands: G operands side by side in one 2-D tensor, quantized in one call.

A grouped operand is a ``(rows, K)`` tensor, blocked along K like any operand, made of G
operands laid side by side either along the rows (``axis=0``: every expert's tokens, every
expert's weight) or along K (``axis=1``: Wgrad's token axis, each expert's tokens padded to
the block on their own).  Each group keeps everything a separate operand has -- its SR key,
the global SR index of each element, and for two-level formats (NVFP4) its own tensor amax
-- and blocks and RHT tiles never cross a group boundary (the caller pads K per group), so
every group's values are bitwise those ``fake_quantize`` gives for that group alone: the
quantizer's arithmetic is elementwise, per block or (the RHT butterfly) per tile.

Specification: docs/backends.md ("Grouped operands").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .formats import FP4Format, make_format
from .hadamard import RHT
from .quantize import _block_amax, _blocked, _rotate, _run_core, check_quantize_args

_M31 = (1 << 31) - 1


@dataclass(frozen=True)
class Segments:
    """Group sizes along ``axis`` (0: rows, 1: the blocked K axis) of a grouped operand."""
    axis: int
    sizes: tuple[int, ...]

    def __post_init__(self):
        if self.axis not in (0, 1):
            raise ValueError(f"Segments.axis must be 0 (rows) or 1 (K) (got {self.axis})")

    def ids(self, device, unit: int = 1) -> torch.Tensor:
        """The group of every row / column (or of every ``unit``-sized run of them)."""
        counts = torch.tensor([s // unit for s in self.sizes], dtype=torch.int64, device=device)
        return torch.repeat_interleave(torch.arange(len(self.sizes), device=device), counts)

    def local(self, device) -> torch.Tensor:
        """Position of every row / column inside its own group."""
        starts, total = [], 0
        for s in self.sizes:
            starts.append(total)
            total += s
        n = torch.arange(total, dtype=torch.int64, device=device)
        return n - torch.tensor(starts, dtype=torch.int64, device=device)[self.ids(device)] if total else n


def _units(fmt: FP4Format, seg: Segments) -> int:
    """How many grouped-axis elements one block spans (a group holds whole blocks)."""
    return fmt.block if (seg.axis == 1 or fmt.block_2d) else 1


def check_segments(x: torch.Tensor, fmt: FP4Format, seg: Segments, rht: RHT | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"a grouped operand is 2-D (got shape {tuple(x.shape)})")
    if sum(seg.sizes) != x.shape[seg.axis]:
        raise ValueError(f"groups of {sum(seg.sizes)} along axis {seg.axis} do not tile shape {tuple(x.shape)}")
    need = max(_units(fmt, seg), rht.size if (rht is not None and seg.axis == 1) else 1)
    bad = [s for s in seg.sizes if s % need]
    if bad:
        raise ValueError(f"{fmt.name}: a group of {bad[0]} along axis {seg.axis} is not whole blocks / RHT tiles "
                         f"of {need}: pad each group on its own")


def grouped_tensor_amax(x: torch.Tensor, fmt: str | FP4Format, rht: RHT | None, seg: Segments) -> torch.Tensor:
    """fp32 ``(G,)``: each group's tensor amax, exactly ``quantize.tensor_amax`` of that group
    alone (after the RHT, over its finite blocks; 0 for an empty group)."""
    fmt = make_format(fmt)
    check_segments(x, fmt, seg, rht)
    rot = rht.signs_on(x.device) if rht is not None else None
    amax = _block_amax(_blocked(_rotate(x.detach().contiguous(), rot), fmt), fmt)
    amax = torch.where(torch.isfinite(amax), amax, 0.0)
    # block amaxes are (rows, K/b, 1), or (rows/b, 1, K/b, 1) for 2-D blocks: reduce to one per row-run / block column
    dims = {(False, 0): (1, 2), (False, 1): (0, 2), (True, 0): (1, 2, 3), (True, 1): (0, 1, 3)}[fmt.block_2d, seg.axis]
    per = amax.amax(dim=dims)
    out = torch.zeros(len(seg.sizes), dtype=per.dtype, device=x.device)
    return out.scatter_reduce_(0, seg.ids(x.device, _units(fmt, seg)), per.reshape(-1), "amax")


def _per_block(values: torch.Tensor, fmt: FP4Format, seg: Segments, x: torch.Tensor) -> torch.Tensor:
    """(G,) per-group values broadcast against the block amaxes of ``x``."""
    v = values[seg.ids(x.device, _units(fmt, seg))]
    if fmt.block_2d:
        return v.view(-1, 1, 1, 1) if seg.axis == 0 else v.view(1, 1, -1, 1)
    return v.view(-1, 1, 1) if seg.axis == 0 else v.view(1, -1, 1)


@dataclass(frozen=True)
class GroupedIndex:
    """Global SR indices of a grouped operand in factored form, ``rows[r] * stride + cols[c]``
    (``stride``: an int, or a (1, cols) tensor when each K group has its own row length), so
    no full-size int64 tensor is kept; ``wide``: whether any index can reach 2^31."""
    rows: torch.Tensor
    stride: int | torch.Tensor
    cols: torch.Tensor
    wide: bool

    def block(self, r0: int, r1: int) -> torch.Tensor:
        return self.rows[r0:r1].view(-1, 1) * self.stride + self.cols.view(1, -1)


def default_index(shape, seg: Segments, device) -> GroupedIndex:
    """Global SR indices when every group is a whole, unsharded operand (``SRIndex()``)."""
    rows, cols = shape
    if seg.axis == 0:
        r, c, stride = seg.local(device), torch.arange(cols, device=device), cols
        last = max((s * cols for s in seg.sizes), default=0) - 1
    else:
        r, c = torch.arange(rows, device=device), seg.local(device)
        stride = torch.tensor(seg.sizes, dtype=torch.int64, device=device)[seg.ids(device)].view(1, -1)
        last = max((rows * s for s in seg.sizes), default=0) - 1
    return GroupedIndex(r, stride, c, last >= _M31)


_CHUNK = 1 << 17  # elements per quantizer pass: keeps its ~10 elementwise temporaries in cache on CPU


def fake_quantize_grouped(x: torch.Tensor, fmt: str | FP4Format, seg: Segments, rounding: str = "rtne",
                          rht: RHT | None = None, *, keys: Sequence[int | None] | None = None,
                          index: GroupedIndex | None = None, tensor_amax: torch.Tensor | None = None,
                          fused: bool = False) -> torch.Tensor:
    """Dequantized fp32 values of a grouped operand, blocked along its last dim.

    keys: one SR key per group (SR only; a group without rows may have any key).  index: the
    global SR index of every element (the groups' ``SRIndex`` layout; ``default_index``
    when None).  tensor_amax: ``(G,)`` per-group amax for two-level formats (e.g. all-reduced
    over tensor-parallel ranks; computed here when None).  Non-finite blocks decode to NaN
    (``nonfinite="propagate"``), as the GEMM backends quantize.  Runs in row chunks (rows are
    independent once the amax is known), the same bits as one pass.
    """
    fmt = make_format(fmt)
    check_quantize_args(x, fmt, -1, rounding, rht, "propagate")
    check_segments(x, fmt, seg, rht)
    xm = x.detach().contiguous()
    key = None
    if rounding == "sr":
        if keys is None or len(keys) != len(seg.sizes) or any(k is None for k, s in zip(keys, seg.sizes) if s):
            raise ValueError("a stochastically rounded grouped operand needs one SR key per group")
        kt = torch.tensor([0 if k is None else int(k) for k in keys], dtype=torch.int64, device=x.device)
        key = kt[seg.ids(x.device)].view((-1, 1) if seg.axis == 0 else (1, -1))
        index = index if index is not None else default_index(xm.shape, seg, x.device)
    amax = None
    if fmt.scale == "e4m3":
        amax = _per_block(grouped_tensor_amax(xm, fmt, rht, seg) if tensor_amax is None else tensor_amax.float(),
                          fmt, seg, xm)
    rot = rht.signs_on(x.device) if rht is not None else None
    rows, cols = xm.shape
    unit = fmt.block if fmt.block_2d else 1
    step = max(unit, _CHUNK // max(cols, 1) // unit * unit)
    out = None if rows <= step else torch.empty(xm.shape, dtype=torch.float32, device=x.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        k = key[r0:r1] if key is not None and seg.axis == 0 else key
        a = amax[r0 // unit:r1 // unit] if amax is not None and seg.axis == 0 else amax
        idx = index.block(r0, r1) if key is not None else None
        q = _run_core(fused, xm[r0:r1], fmt, rounding, rot, k, idx, a, True, index.wide if idx is not None else True)
        if out is None:  # one chunk: no copy
            return q[0].reshape(xm.shape)
        out[r0:r1] = q[0].reshape(r1 - r0, cols)
    return out if out is not None else xm.new_zeros(xm.shape, dtype=torch.float32)


__all__ = ["GroupedIndex", "Segments", "default_index", "fake_quantize_grouped", "grouped_tensor_amax"]
