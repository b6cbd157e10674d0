"""Stacked routed experts in their per-expert key form, and back.

The model holds each MoE layer's routed experts stacked (``layers.3.mlp.experts.gate_up.weight``
of shape (E, out, in); model/experts.py).  Checkpoints keep one key per expert
(``layers.3.mlp.experts.<e>.gate_up.weight``, ``linear/expert_linear.py:per_expert_name``), the
keys every earlier version wrote: sharded checkpoints name each expert's slice so, and a whole
state dict of an earlier version (``state.pt``, a to-single file, an HF import) is read through
``stack_experts``.  Extra state (SR generators, RHT signs) stacks as ``{expert: state}``;
AdamW state stacks its moments and keeps one step count.
"""
from __future__ import annotations

import torch

from ..linear.expert_linear import per_expert_name, stacked_name
from .placement import Placement


def _by_stack(d: dict) -> tuple[dict, dict]:
    """``d`` split into its other entries (a stacked name holding the place of its first expert,
    value None for now) and ``{stacked name: {expert: value}}``."""
    out, groups = {}, {}
    for k, v in d.items():
        found = stacked_name(k)
        if found is None:
            out[k] = v
            continue
        groups.setdefault(found[0], {})[found[1]] = v
        out.setdefault(found[0], None)
    return out, groups


def stack_experts(sd: dict) -> dict:
    """A whole state dict with per-expert keys in the stacked form (tensors stacked in expert
    order, extra states as ``{expert: state}``); other keys, and stacked ones, pass as they are.
    The experts of a layer must be 0..E-1 (a whole model's)."""
    out, groups = _by_stack(sd)
    for name, by_expert in groups.items():
        experts = sorted(by_expert)
        if experts != list(range(len(experts))):
            raise ValueError(f"{name}: experts {experts[0]}..{experts[-1]} with gaps (a whole layer has 0..E-1)")
        first = by_expert[experts[0]]
        out[name] = dict(by_expert) if isinstance(first, dict) else torch.stack([by_expert[e] for e in experts])
    return out


def stack_expert_optimizer(states: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """``{fqn: {exp_avg, exp_avg_sq, step}}`` with per-expert fqns in the stacked form.  The
    stack keeps one step count: the largest of its experts' (equal unless an expert of an
    earlier version got no tokens in some step, which AdamW then skipped for it).  ``shapes``
    (the stacked parameters' shapes): an expert without an entry -- earlier versions kept no
    AdamW state for an expert that never got a token -- gets AdamW's fresh state (zeros)."""
    out, groups = _by_stack(states)
    for name, by_expert in groups.items():
        shape = (shapes or {}).get(name)
        experts = list(range(shape[0])) if shape else sorted(by_expert)
        if not set(by_expert) <= set(experts) or (shape is None and experts != list(range(len(experts)))):
            raise ValueError(f"{name}: optimizer state of experts {sorted(by_expert)}, the layer has "
                             f"{len(experts) if shape else 'experts 0..E-1'}")
        fresh = {"exp_avg": torch.zeros(shape[1:]) if shape else None,
                 "exp_avg_sq": torch.zeros(shape[1:]) if shape else None, "step": torch.zeros(())}
        rows = [by_expert.get(e, fresh) for e in experts]
        out[name] = {"exp_avg": torch.stack([r["exp_avg"] for r in rows]),
                     "exp_avg_sq": torch.stack([r["exp_avg_sq"] for r in rows]),
                     "step": torch.stack([torch.as_tensor(r["step"]).float().reshape(()) for r in rows]).max()}
    return out


def unstack_experts(sd: dict, placements: dict[str, Placement]) -> dict:
    """The stacked state dict ``sd`` of a model whose parameters are placed as ``placements``
    in the per-expert key form (views, no copies)."""
    out = {}
    for k, v in sd.items():
        p = placements.get(k)
        if isinstance(v, dict) and v and all(isinstance(e, int) for e in v):  # an ExpertLinear's extra state
            out.update({per_expert_name(k, e): s for e, s in v.items()})
        elif p is not None and p.experts is not None:
            out.update({per_expert_name(k, e): v[j] for j, e in enumerate(p.experts)})
        else:
            out[k] = v
    return out


def unstack_expert_optimizer(states: dict, placements: dict[str, Placement]) -> dict:
    """``{fqn: {exp_avg, exp_avg_sq, step}}`` of stacked parameters in the per-expert form."""
    out = {}
    for fqn, st in states.items():
        p = placements.get(fqn)
        if p is None or p.experts is None:
            out[fqn] = st
            continue
        for j, e in enumerate(p.experts):
            out[per_expert_name(fqn, e)] = {"exp_avg": st["exp_avg"][j], "exp_avg_sq": st["exp_avg_sq"][j],
                                            "step": st["step"]}
    return out


def per_expert_views(named, placements: dict[str, Placement]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs (parameters, their gradients, ...) with each stacked expert
    tensor split into its experts' views, in the order earlier versions' models listed one
    module per expert: a layer's expert 0 (gate_up weight [and bias], down weight [and
    bias]), then expert 1, ...; everything else in place.  Sums over parameters (the gradient
    norm) taken in this order round as they did."""
    named = list(named)
    out, done = [], set()
    for n, t in named:
        p = placements.get(n)
        if p is None or p.experts is None:
            out.append((n, t))
            continue
        layer = n.rpartition(".experts.")[0]
        if layer in done:
            continue
        done.add(layer)
        members = [(m, u) for m, u in named if placements.get(m) is not None and placements[m].experts is not None
                   and m.rpartition(".experts.")[0] == layer]
        out += [(per_expert_name(m, e), u[j]) for j, e in enumerate(p.experts) for m, u in members]
    return out


def per_expert_shapes(model: torch.nn.Module, placements: dict[str, Placement]) -> dict[str, tuple[int, ...]]:
    """``{checkpoint key: shape}`` of ``model``'s weights (no extra state), experts per expert."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("_extra_state"):
            continue
        p = placements.get(k)
        if p is not None and p.experts is not None:
            out.update({per_expert_name(k, e): tuple(v.shape[1:]) for e in p.experts})
        else:
            out[k] = tuple(v.shape)
    return out


__all__ = ["per_expert_shapes", "per_expert_views", "stack_expert_optimizer", "stack_experts",
           "unstack_expert_optimizer", "unstack_experts"]
