"""One linear of a layer's routed experts, stacked: a single (E, out, in) weight.

``ExpertLinear(layout, experts, num_experts, sr_seeds)`` holds, for the routed experts
``experts`` (global indices, the ones this rank runs), one of their linears (gate_up or
down) as one weight Parameter of shape (E, out, in) and an optional (E, out) bias: no
per-expert modules or Parameters, so a layer of hundreds of experts is two tensors, and the
grouped GEMMs (linear/grouped.py) read the weight as it is.

``layout`` is one expert's linear as the factory builds it (on the meta device: it holds
no values): a ``QuantizedLinear`` or a tensor-parallel one.  It owns what all the experts
share -- the recipe of each precision phase and its high-precision layer rule, the shape
checks, the collectives, where a shard's operands sit in the unsplit layer's (SR indices,
sub-GEMMs) -- and runs one expert alone (``forward_with``), which is how the experts run
when a phase cannot group (a layer kept in high precision).  Each expert keeps what its
own linear had: an SR seed (``sr_seeds[j]``, derived from its per-expert name), an SR
generator and a telemetry log, i.e. one ``GemmState`` per expert and phase, so every
expert quantizes exactly as a separate linear would.

The extra state (checkpointed) is ``{global expert: {"sr_generator", "rht_signs"}}``:
each expert's entries of a separate linear.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import torch
from torch import nn

from ..fp4.recipes import GEMM_ROLES, Recipe
from .gemm import GemmState
from .grouped import grouped_linear
from .quantized_linear import PhasedLinear, QuantizedLinear


# A stacked expert parameter ``<layer>.experts.<proj>.<attr>`` is checkpointed per expert as
# ``<layer>.experts.<e>.<proj>.<attr>``: the name each expert's own module had in earlier
# versions, so every existing checkpoint keeps its keys (Megatron-LM's per-expert layout too).
_PER_EXPERT = re.compile(r"^(?P<head>(?:.*\.)?experts)\.(?P<e>\d+)\.(?P<tail>[^.]+\..+)$")


def per_expert_name(name: str, e: int) -> str:
    """``layers.3.mlp.experts.gate_up.weight`` -> ``layers.3.mlp.experts.<e>.gate_up.weight``."""
    dotted = "." + name
    i = dotted.rfind(".experts.")
    if i < 0:
        raise ValueError(f"{name!r} is not a stacked expert name")
    return f"{dotted[1:i + 1]}experts.{int(e)}.{dotted[i + len('.experts.'):]}"


def stacked_name(name: str) -> tuple[str, int] | None:
    """``layers.3.mlp.experts.7.down.weight`` -> (``layers.3.mlp.experts.down.weight``, 7);
    None for a name that is no per-expert name."""
    m = _PER_EXPERT.match(name)
    return (f"{m['head']}.{m['tail']}", int(m["e"])) if m else None



@dataclasses.dataclass(frozen=True)
class ExpertPhase:
    """One precision phase of the stacked experts: the recipe, whether it quantizes, and
    each expert's GEMM state (index j: the j-th expert held)."""
    recipe: Recipe
    quantized: bool
    gemms: tuple[GemmState, ...]


class _Layout:
    """Holds the layout linear without registering it as a submodule (it has no values, and
    iterating the model's linears must not find it)."""

    def __init__(self, linear: QuantizedLinear):
        self.linear = linear


class ExpertLinear(PhasedLinear, nn.Module):
    """The routed experts ``experts`` of one layer, one of their linears, stacked (module doc)."""

    def __init__(self, layout: QuantizedLinear, experts: Sequence[int], num_experts: int, sr_seeds: Sequence[int],
                 *, placements: dict | None = None, device=None, dtype=None):
        super().__init__()
        self.experts = tuple(int(e) for e in experts)
        if len(sr_seeds) != len(self.experts):
            raise ValueError(f"{len(sr_seeds)} SR seeds for {len(self.experts)} experts")
        self.num_experts = int(num_experts)
        self._layout = _Layout(layout)
        self.in_features, self.out_features = layout.in_features, layout.out_features
        self.layer_index, self.step_context, self.hooks = layout.layer_index, layout.step_context, layout.hooks
        n = len(self.experts)
        self.weight = nn.Parameter(torch.empty(n, self.out_features, self.in_features, device=device, dtype=dtype))
        self.bias = (nn.Parameter(torch.empty(n, self.out_features, device=device, dtype=dtype))
                     if layout.bias is not None else None)
        # one SR generator per expert, shared by its phases (as a linear's phases share theirs)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in sr_seeds]
        self.phases = tuple(
            ExpertPhase(p.recipe, p.quantized, tuple(dataclasses.replace(p.gemms, generator=g, sr_seed=int(s), log={})
                                                     for g, s in zip(generators, sr_seeds)))
            for p in layout.phases)
        self.placements = placements or {}
        self.reset_parameters()

    @property
    def layout(self) -> QuantizedLinear:
        return self._layout.linear

    # -- the phase this step runs: PhasedLinear (phase, recipe, quantized, gemms: one per expert) --
    def groupable(self) -> bool:
        """Whether this phase runs as grouped GEMMs: every GEMM in FP4 (else each expert runs
        on its own: the recipe keeps this layer, or one of its GEMMs, in high precision)."""
        return self.quantized and all(self.recipe.gemm(g).quantized for g in GEMM_ROLES)

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        for j in range(len(self.experts)):  # each expert as nn.Linear's default; models re-init
            nn.init.kaiming_uniform_(self.weight[j], a=5 ** 0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def select(self, positions: Sequence[int]) -> "ExpertLinear":
        """A stack of the experts at ``positions`` (of those held) only: their weights (copied
        out of this stack, so the rest is freed with it), GEMM states and generators."""
        pos = [int(j) for j in positions]
        experts = tuple(self.experts[j] for j in pos)
        out = ExpertLinear(self.layout, experts, self.num_experts, [self.phases[0].gemms[j].sr_seed for j in pos],
                           placements={k: dataclasses.replace(p, experts=experts) for k, p in self.placements.items()},
                           device="meta", dtype=self.weight.dtype)
        out.phases = tuple(dataclasses.replace(p, gemms=tuple(p.gemms[j] for j in pos)) for p in self.phases)
        idx = torch.tensor(pos, dtype=torch.long, device=self.weight.device)
        with torch.no_grad():
            out.weight = nn.Parameter(self.weight.index_select(0, idx), requires_grad=self.weight.requires_grad)
            if self.bias is not None:
                out.bias = nn.Parameter(self.bias.index_select(0, idx), requires_grad=self.bias.requires_grad)
        return out

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Rows of ``x`` grouped by expert (``sizes[j]`` for the j-th expert held) through
        their experts' linear: (sum sizes, out).  Grouped GEMMs where the phase allows."""
        if self.groupable():
            return grouped_linear(self, x, sizes)
        return torch.cat([self.expert_forward(j, chunk) for j, chunk in enumerate(x.split(list(sizes)))
                          if chunk.shape[0]])

    def expert_forward(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The j-th expert held, alone: what its own linear runs (the reference of the grouped path)."""
        return self.layout.forward_with(x, self.weight[j], None if self.bias is None else self.bias[j],
                                        self.gemms[j])

    # -- telemetry ----------------------------------------------------------------------
    def set_collect_stats(self, on: bool = True) -> None:
        for p in self.phases:
            for g in p.gemms:
                g.collect_stats = on

    # -- checkpointed state: each expert's SR generator and the RHT signs ----------------
    def get_extra_state(self):
        signs = self.phases[0].gemms[0].rht.signs if self.experts else None
        return {e: {"sr_generator": g.generator.get_state(), "rht_signs": signs.clone()}
                for e, g in zip(self.experts, self.phases[0].gemms)}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or sorted(state) != sorted(self.experts):
            raise ValueError(f"extra state for experts {sorted(state) if isinstance(state, dict) else state!r}, "
                             f"this layer holds {list(self.experts)}")
        base = self.phases[0].gemms
        for j, e in enumerate(self.experts):
            saved = state[e]["sr_generator"].cpu()
            expected = base[j].generator.get_state().numel()
            if saved.dtype != torch.uint8 or saved.numel() != expected:
                raise ValueError(f"expert {e}: sr_generator state of {saved.numel()} bytes is not a CPU generator "
                                 f"state ({expected} bytes)")
            base[j].generator.set_state(saved)
            if not torch.equal(state[e]["rht_signs"].cpu(), base[j].rht.signs):
                raise ValueError(f"expert {e}: its RHT signs are not the recipe's (rht_seed "
                                 f"{self.phases[0].recipe.rht_seed}); stacked experts share one set")

    def extra_repr(self) -> str:
        mode = self.recipe.name if self.quantized else "high precision"
        held = f"{self.experts[0]}..{self.experts[-1]}" if self.experts else "none"
        return (f"experts {held} of {self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}, {mode}")


__all__ = ["ExpertLinear", "ExpertPhase", "per_expert_name", "stacked_name"]
