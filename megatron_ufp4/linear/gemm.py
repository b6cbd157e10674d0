"""One linear's three GEMMs as the recipe says: operands prepared once, run on a backend.

``GemmState`` is what one linear (in one precision phase) needs for its GEMMs: recipe, RHT,
SR generator and seed, backend, where a shard's operands sit in the unsplit layer's
(``sr_index``) and which GEMMs run in parts (``splits``), telemetry.  It turns
``(gemm, A, B, position)`` into two backend ``Operand``s: it pads the
reduction axis to the quantization granularity, picks the RHT, derives the SR keys and
computes the tensor amax of two-level-scaled formats (all-reduced over the tensor-parallel
group when the operand is a shard).  Single-process and parallel linears go through the
same code, so a shard's operands are the unsplit operands' by construction.

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

from ..fp4.grouped import Segments, grouped_tensor_amax
from ..fp4.hadamard import RHT
from ..fp4.recipes import GEMM_ROLES, GemmQuant, Recipe
from ..fp4.sr_random import SRIndex, derive_key, draw_key
from .backends import Operand, get_backend

GEMM_ORDER = {g: i for i, g in enumerate(GEMM_ROLES)}


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

    def operands(self, gemm: str, a: torch.Tensor, b: torch.Tensor, position: tuple[int, int] | None,
                 keys: tuple[int | None, int | None] | None = None) -> tuple[Operand, Operand]:
        """A and B of a quantized GEMM, ready for ``backend.gemm``; ``keys``: SR keys already drawn
        for this call (by the grouped GEMM it is logged for), else ``sr_keys``."""
        spec = self.recipe.gemm(gemm)
        rht = self.rht if spec.rht else None
        pad = (-a.shape[-1]) % reduction_multiple(spec, self.rht.size)
        if pad:  # e.g. the token axis of Wgrad; zeros add nothing to A @ B^T
            a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
        keys = self.sr_keys(gemm, position) if keys is None else keys
        index = self.sr_index.get(gemm, (None, None))
        ops = []
        for t, quant, key, idx in zip((a, b), (spec.a, spec.b), keys, index):
            ops.append(Operand(t, quant, rht, key if quant.rounding == "sr" else None, idx,
                               self.tensor_amax(t, quant, rht)))
        return ops[0], ops[1]

    def tensor_amax(self, t: torch.Tensor, quant, rht: RHT | None,
                    groups: Segments | None = None) -> torch.Tensor | None:
        """The amax a two-level-scaled format (NVFP4) scales by: the whole logical tensor's
        (each group's, for a grouped operand), all-reduced over TP when the operand is a
        shard; None for other formats.  Dense and grouped operands both take it from here."""
        if quant.fmt.scale != "e4m3":
            return None
        if groups is None:
            amax = get_backend(self.backend_name).tensor_amax(t, quant.fmt, rht)
        else:
            amax = grouped_tensor_amax(t, quant.fmt, rht, groups)
        return self.amax_reduce(amax) if self.amax_reduce is not None else amax

    def operand_position(self, gemm: str, which: str):
        """Where operand ``which`` ("a" / "b") of ``gemm`` sits in the unsplit layer's operand:
        (its SRIndex, or None) and the GemmSplit it runs in (or None)."""
        return self.sr_index.get(gemm, (None, None))["ab".index(which)], self.splits.get(gemm)

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
                  and not self.collect_stats and a2.shape[-1] % reduction_multiple(s2, self.rht.size) == 0)
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
