"""Telemetry over a model's FP4 linears: which recipe each layer runs, operand statistics.

Dense linears (``QuantizedLinear`` and its tensor-parallel subclasses) and stacked routed
experts (``ExpertLinear``, one entry per expert under its per-expert name) alike.
"""
from __future__ import annotations

import math

from torch import nn

from .expert_linear import ExpertLinear, per_expert_name
from .gemm import GemmState
from .quantized_linear import QuantizedLinear

LINEARS = (QuantizedLinear, ExpertLinear)


def precision_table(model: nn.Module) -> str:
    """One line per transformer layer: which recipe its quantized linears run (from the
    modules and their ``layer_index`` metadata; linears outside a layer by module name);
    under a precision schedule, one column per phase."""
    rows: dict[str, list[set]] = {}
    phases = 1
    for name, mod in model.named_modules():
        if isinstance(mod, LINEARS):
            layer = str(mod.layer_index) if mod.layer_index is not None else name
            phases = max(phases, len(mod.phases))
            row = rows.setdefault(layer, [])
            for i, p in enumerate(mod.phases):
                if i == len(row):
                    row.append(set())
                row[i].add(p.recipe.label() if p.quantized else "high precision")
    cells = {layer: [", ".join(sorted(kinds)) for kinds in row] for layer, row in rows.items()}
    if phases == 1:
        return "\n".join(["layer  linears run as"] + [f"{layer:<6} {c[0]}" for layer, c in cells.items()])
    width = [max([len(f"phase {i}")] + [len(c[i]) for c in cells.values() if i < len(c)]) for i in range(phases)]
    lines = ["layer  linears run as, per precision phase",
             f"{'':<6} " + " | ".join(f"{f'phase {i}':<{w}}" for i, w in enumerate(width))]
    for layer, c in cells.items():
        lines.append(f"{layer:<6} " + " | ".join(f"{v:<{w}}" for v, w in zip(c, width)).rstrip())
    return "\n".join(lines)


def set_quant_stats(modules, on: bool) -> None:
    """Switch operand statistics on or off in every ``QuantizedLinear`` of ``modules`` (a
    module or a list).  On, a dY pair is quantized as two calls (the same keys and bits), and
    each quantized operand costs one more pass in float64."""
    for root in (modules if isinstance(modules, (list, tuple)) else [modules]):
        for mod in root.modules():
            if isinstance(mod, LINEARS):  # every phase's runners: off stays off after a phase change
                mod.set_collect_stats(on)


def quant_stats(modules) -> dict:
    """``{module name: {gemm: {"ran", "backend", "rht", <role>: {amax, alpha, sqnr_db, nmse,
    saturated, zeroed}}}}`` of the quantized GEMMs that ran with statistics on since the last
    call (the last call of each GEMM); the statistics are consumed."""
    out = {}
    for root in (modules if isinstance(modules, (list, tuple)) else [modules]):
        for name, mod in root.named_modules():
            if not (isinstance(mod, LINEARS) and mod.quantized):
                continue
            for gemm_name, gemms in gemm_states(name, mod):
                per_gemm = _consume_stats(gemms, mod.recipe.label())
                if per_gemm:
                    out[gemm_name] = per_gemm
    return out


def gemm_states(name: str, mod) -> list[tuple[str, GemmState]]:
    """``(linear name, GemmState)`` of a linear's current phase: one for a ``QuantizedLinear``,
    one per expert, under the expert's own name, for an ``ExpertLinear``."""
    if isinstance(mod, ExpertLinear):
        return [(per_expert_name(name, e), g) for e, g in zip(mod.experts, mod.gemms)]
    return [(name, mod.gemms)]


def _consume_stats(gemms: GemmState, recipe_label: str) -> dict:
    per_gemm = {}
    for gemm, entry in gemms.log.items():
        stats = entry.pop("stats", None)
        if stats is None:
            continue
        row = {"ran": entry.get("ran"), "backend": entry.get("backend"), "rht": entry.get("rht"),
               "recipe": recipe_label}
        for role, st in stats.items():
            nmse = st.get("nmse")
            sqnr = 10 * math.log10(1 / nmse) if nmse else None  # exact operands: no finite SQNR
            row[role] = {**st, "sqnr_db": sqnr}
        per_gemm[gemm] = row
    return per_gemm


__all__ = ["gemm_states", "precision_table", "quant_stats", "set_quant_stats"]
