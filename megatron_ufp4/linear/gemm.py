"""One linear's three GEMMs as the recipe says: operands prepared once, run on a backend.

``GemmState`` is what one linear (in one precision phase) needs for its GEMMs: recipe, RHT,
SR generator and seed, backend, where a shard's operands sit in the unsplit layer's
(``sr_index``) and which GEMMs run in parts (``splits``), telemetry.  It turns
``(gemm, A, B, position)`` into two backend ``Operand``s: it pads the
reduction axis to the quantization granularity, picks the RHT, derives the SR keys and
computes the tensor amax of two-level-scaled formats (all-reduced over the tensor-parallel
group when the operand is a shard).  Single-process and parallel linears go through the
same code, so a shard's operands are the unsplit operands' by construction; a layer's
experts run as grouped GEMMs (``linear/grouped.py``) get theirs from the same
``GemmState.operand``, given the groups.

SR keys.  In training (``position`` = (step, micro-batch) from the model's
``StepContext``) a key is a pure function of (module seed, step, micro-batch, GEMM,
operand): every layout, schedule and resume draws identical noise.  Outside training
(``position`` None) keys are drawn from the module's seeded generator, A before B.

Specification: docs/backends.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..fp4.grouped import GroupedIndex, Segments, grouped_tensor_amax
from ..fp4.hadamard import RHT
from ..fp4.recipes import GEMM_ROLES, GemmQuant, Recipe
from ..fp4.sr_random import SRIndex, derive_key, draw_key
from .backends import GroupedOperand, Operand, get_backend

GEMM_ORDER = {g: i for i, g in enumerate(GEMM_ROLES)}
_M31 = (1 << 31) - 1


def reduction_multiple(spec: GemmQuant, rht_size: int) -> int:
    """Granularity of a GEMM's reduction axis: its operands' blocks and the RHT tile."""
    if not spec.quantized:
        return 1
    return max(spec.a.fmt.block, spec.b.fmt.block, rht_size if spec.rht else 1)


@dataclass(frozen=True)
class GemmPart:
    """One sub-GEMM of a GEMM run in parts: which rows / K columns of A and B it takes and
    where those sit in the logical operands (a fused column shard is not one block)."""
    a_rows: slice | None = None
    a_cols: slice | None = None
    a_index: SRIndex | None = None
    b_rows: slice | None = None
    b_cols: slice | None = None
    b_index: SRIndex | None = None


@dataclass
class GemmSplit:
    parts: Sequence[GemmPart]
    combine: str  # "cat_cols" (split N), "sum" (split K) or "cat_rows" (split M)

    def join(self, outs: list[torch.Tensor]) -> torch.Tensor:
        if self.combine == "sum":
            return functools.reduce(torch.add, outs)
        return torch.cat(outs, dim=1 if self.combine == "cat_cols" else 0)


# -- SR indices of a grouped operand -----------------------------------------------------------
def _operand_parts(split: GemmSplit, which: str):
    """(axis, [(slice, SRIndex)], whole-operand SRIndex) of operand ``which`` ("a" / "b") of a
    split GEMM: the axis its parts cut, or None when the parts take it whole."""
    first = split.parts[0]
    for axis, cut in ((0, f"{which}_rows"), (1, f"{which}_cols")):
        if getattr(first, cut) is not None:
            return axis, [(getattr(p, cut), getattr(p, f"{which}_index") or SRIndex()) for p in split.parts], None
    return None, None, getattr(first, f"{which}_index")


def _coords(local: torch.Tensor, offset: int, parts, axis: int) -> torch.Tensor:
    """Global coordinates of ``local`` positions: plus ``offset``, or per part (equal
    consecutive slices, as a fused shard's parts are) plus that part's offset."""
    if not parts:
        return local + offset
    n = parts[0][0].stop - parts[0][0].start
    offs = torch.tensor([(i.row_offset if axis == 0 else i.col_offset) for _, i in parts], device=local.device)
    return offs[local // n] + local % n


def grouped_index(shape, seg: Segments, base: SRIndex | None, parts_axis, parts, device) -> GroupedIndex:
    """Global SR indices of a grouped operand whose groups each sit in their logical operand
    like the per-expert operand: ``base`` (its ``SRIndex``), or, for a split GEMM, ``parts``
    along ``parts_axis`` (each with its own ``SRIndex``)."""
    rows, cols = shape
    base = base or SRIndex()
    r_local = seg.local(device) if seg.axis == 0 else torch.arange(rows, device=device)
    c_local = seg.local(device) if seg.axis == 1 else torch.arange(cols, device=device)
    r = _coords(r_local, base.row_offset, parts if parts_axis == 0 else None, 0)
    c = _coords(c_local, base.col_offset, parts if parts_axis == 1 else None, 1)
    stride = base.row_stride
    if parts_axis == 1:
        stride = parts[0][1].row_stride
    if stride is None:  # the (part) operand's own columns: K, or each group's padded tokens
        stride = (torch.tensor(seg.sizes, dtype=torch.int64, device=device)[seg.ids(device)].view(1, -1)
                  if seg.axis == 1 else cols)
    # whether any index reaches 2^31 only decides a check (same bits): bound it on the host
    r_max = max(rows, max(seg.sizes, default=0)) + base.row_offset + max(
        [i.row_offset for _, i in parts] if parts_axis == 0 else [0])
    c_max = max(cols, max(seg.sizes, default=0)) + base.col_offset + max(
        [i.col_offset for _, i in parts] if parts_axis == 1 else [0])
    s_max = stride if isinstance(stride, int) else max(seg.sizes, default=0)
    return GroupedIndex(r, stride, c, r_max * s_max + c_max >= _M31)


@dataclass
class GemmState:
    """One linear's GEMM state in one precision phase (see module doc)."""
    recipe: Recipe
    rht: RHT
    generator: torch.Generator
    backend_name: str
    collect_stats: bool = False
    sr_seed: int = 0
    amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # all-reduce(max) over TP for shards
    sr_index: dict = field(default_factory=dict)  # gemm -> (SRIndex of A, of B) for sharded operands
    splits: dict = field(default_factory=dict)  # gemm -> GemmSplit: run in sub-GEMMs (a strided TP shard)
    log: dict = field(default_factory=dict)  # gemm -> what actually ran (+ stats)

    def sr_keys(self, gemm: str, position: tuple[int, int] | None) -> tuple[int | None, int | None]:
        spec = self.recipe.gemm(gemm)
        if position is not None:
            g = GEMM_ORDER[gemm]
            return derive_key(self.sr_seed, *position, g, 0), derive_key(self.sr_seed, *position, g, 1)
        return tuple(draw_key(self.generator) if op.rounding == "sr" else None for op in (spec.a, spec.b))

    def padded(self, gemm: str, n: int) -> int:
        """``n`` reduction-axis elements rounded up to ``gemm``'s granularity (its operands' blocks
        and RHT tile): a dense operand's K, or one expert's tokens in a grouped Wgrad."""
        m = reduction_multiple(self.recipe.gemm(gemm), self.rht.size)
        return -(-n // m) * m

    def operand(self, gemm: str, which: str, t: torch.Tensor, key, groups: Segments | None = None):
        """Operand ``which`` ("a" / "b") of ``gemm``, K already padded: an ``Operand`` (``key``: its
        SR key), or with ``groups`` a ``GroupedOperand`` of experts laid side by side (``key``: one
        per group).  RHT, SR key and position, and tensor amax are decided here for both, so a
        grouped operand's groups are each what the expert's dense operand would be."""
        spec = self.recipe.gemm(gemm)
        quant = spec.a if which == "a" else spec.b
        rht = self.rht if spec.rht else None
        sr = quant.rounding == "sr"
        amax = self.tensor_amax(t, quant, rht, groups)
        if groups is None:
            index = self.sr_index.get(gemm, (None, None))["ab".index(which)]
            return Operand(t, quant, rht, key if sr else None, index, amax)
        index = self._grouped_index(gemm, which, t, groups) if sr else None
        return GroupedOperand(t, quant, groups, rht, tuple(key) if sr else None, index, amax)

    def operands(self, gemm: str, a: torch.Tensor, b: torch.Tensor, position: tuple[int, int] | None,
                 keys: tuple[int | None, int | None] | None = None) -> tuple[Operand, Operand]:
        """A and B of a quantized GEMM, ready for ``backend.gemm``; ``keys``: SR keys already drawn
        for this call (by the grouped GEMM it is logged for), else ``sr_keys``."""
        pad = self.padded(gemm, a.shape[-1]) - a.shape[-1]
        if pad:  # e.g. the token axis of Wgrad; zeros add nothing to A @ B^T
            a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
        ka, kb = self.sr_keys(gemm, position) if keys is None else keys
        return self.operand(gemm, "a", a, ka), self.operand(gemm, "b", b, kb)

    def tensor_amax(self, t: torch.Tensor, quant, rht: RHT | None,
                    groups: Segments | None = None) -> torch.Tensor | None:
        """The amax a two-level-scaled format (NVFP4) scales by: the whole logical tensor's
        (each group's, for a grouped operand), all-reduced over TP when the operand is a
        shard; None for other formats."""
        if quant.fmt.scale != "e4m3":
            return None
        if groups is None:
            amax = get_backend(self.backend_name).tensor_amax(t, quant.fmt, rht)
        else:
            amax = grouped_tensor_amax(t, quant.fmt, rht, groups)
        return self.amax_reduce(amax) if self.amax_reduce is not None else amax

    def _grouped_index(self, gemm: str, which: str, t: torch.Tensor, groups: Segments) -> GroupedIndex:
        """Global SR indices of a grouped operand: each group sits in its logical operand where
        this layout's dense operand sits (``sr_index``), or, for a GEMM run in parts
        (``splits``), part by part."""
        base, axis, parts = self.sr_index.get(gemm, (None, None))["ab".index(which)], None, None
        split = self.splits.get(gemm)
        if split is not None:
            axis, parts, base = _operand_parts(split, which)
        return grouped_index(t.shape, groups, base, axis, parts, t.device)

    def record(self, gemm: str) -> dict:
        """Count one call of ``gemm`` in the telemetry log (what ran); returns its entry."""
        spec = self.recipe.gemm(gemm)
        entry = self.log.setdefault(gemm, {"calls": 0})
        entry["calls"] += 1
        if not spec.quantized:
            entry.update(ran="high precision", backend="torch")
            return entry
        ra, rb = GEMM_ROLES[gemm]
        entry.update(backend=self.backend_name, rht=f"{self.rht.size}" if spec.rht else "off",
                     ran={ra: f"{spec.a.fmt.describe()} {spec.a.rounding}",
                          rb: f"{spec.b.fmt.describe()} {spec.b.rounding}"})
        return entry

    def run_pair(self, first: tuple[str, torch.Tensor, torch.Tensor], second: tuple[str, torch.Tensor, torch.Tensor],
                 position: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two GEMMs whose A operands are one tensor and its transpose (Dgrad's dY and Wgrad's
        dY^T): both A operands come from one ``backend.quantize_pair`` call, which a kernel
        backend serves from a single read.  The same operands, keys and bits as two ``run``
        calls in this order, which is what runs when the pair cannot share a read (a GEMM in
        high precision or in parts, telemetry on, or Wgrad's K needing padding)."""
        (g1, a1, b1), (g2, a2, b2) = first, second
        s1, s2 = self.recipe.gemm(g1), self.recipe.gemm(g2)
        shared = (s1.quantized and s2.quantized and self.splits.get(g1) is None and self.splits.get(g2) is None
                  and not self.collect_stats and self.padded(g2, a2.shape[-1]) == a2.shape[-1])
        if not shared:
            return self.run(g1, a1, b1, position), self.run(g2, a2, b2, position)
        self.record(g1)
        self.record(g2)
        qa1, qb1 = self.operands(g1, a1, b1, position)
        qa2, qb2 = self.operands(g2, a2, b2, position)
        backend = get_backend(self.backend_name)
        ra1, ra2 = backend.quantize_pair(qa1, qa2)
        return backend.matmul(ra1, backend.quantize(qb1)), backend.matmul(ra2, backend.quantize(qb2))

    def run(self, gemm: str, a: torch.Tensor, b: torch.Tensor, position: tuple[int, int] | None,
            record: bool = True, keys: tuple[int | None, int | None] | None = None) -> torch.Tensor:
        """A @ B^T in FP32 as the recipe quantizes ``gemm`` (as sub-GEMMs where ``splits`` says);
        ``record=False``: leave the telemetry log alone (a recomputed forward); ``keys``: see ``operands``."""
        split = self.splits.get(gemm)
        spec = self.recipe.gemm(gemm)
        entry = self.record(gemm) if record else {}
        if not spec.quantized:
            return a.float() @ b.float().T
        ra, rb = GEMM_ROLES[gemm]
        stats = {} if self.collect_stats and record else None
        qa, qb = self.operands(gemm, a, b, position, keys)
        backend = get_backend(self.backend_name)
        if split is None:
            out = backend.gemm(qa, qb, stats)
        else:
            out = split.join([backend.gemm(qa.part(p.a_rows, p.a_cols, p.a_index),
                                           qb.part(p.b_rows, p.b_cols, p.b_index), stats) for p in split.parts])
        if stats is not None:
            entry["stats"] = {ra: stats["a"], rb: stats["b"]}
        return out
