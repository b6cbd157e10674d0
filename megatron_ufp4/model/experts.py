"""A layer's routed experts: two stacked linears, run as grouped GEMMs.

``GroupedExperts`` holds the routed experts this process runs as two ``ExpertLinear``s --
``gate_up`` (E, 2f, h) and ``down`` (E, h, f) -- with no per-expert modules or Parameters:

    gate_up: one grouped GEMM per GEMM over all experts     (linear/grouped.py)
    silu(gate) * up on all rows at once                     (elementwise)
    down:    one grouped GEMM per GEMM

bit for bit the per-expert loop (``forward_loop``, kept as the reference): each expert's
slices with its own SR seed and generator, exactly as a separate SwiGLU per expert.  Layers
the recipe keeps in high precision run the loop; telemetry steps stay grouped (each
expert's statistics come from its own GEMM state: ``GroupedPlan.record_stats``).

Which experts a rank holds is the linear factory's decision (``factory.local_experts``:
all of them in one process, the EP rank's share under expert parallelism); ``select``
keeps a subset of a built layer.  Every expert keeps its *global* index: SR seeds,
initialisation keys and checkpoint keys are those of ``mlp.experts.<e>.gate_up`` etc.
(model/placement.py ``per_expert_name``), whatever the layout.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .init import KeyedInit
from ..linear.expert_linear import per_expert_name
from .placement import placement_of


class GroupedExperts(nn.Module):
    """The routed SwiGLU experts ``experts`` (global indices) of one MoE layer, stacked."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, linear_factory, layer_index: int, num_experts: int,
                 experts: Sequence[int], *, name: str = "mlp.experts", bias: bool = False):
        super().__init__()
        self.num_experts = num_experts
        common = dict(layer_index=layer_index, name=name, bias=bias, num_experts=num_experts, experts=experts)
        # gate_up: two fused parts ([gate; up]), split on their own under TP, as a dense SwiGLU's
        self.gate_up = linear_factory.experts(hidden_size, 2 * ffn_hidden_size, kind="column", proj="gate_up",
                                              parts=2, **common)
        self.down = linear_factory.experts(ffn_hidden_size, hidden_size, kind="row", proj="down", **common)

    @property
    def indices(self) -> tuple[int, ...]:
        return self.gate_up.experts

    def __len__(self) -> int:
        return len(self.indices)

    def select(self, indices: Sequence[int]) -> "GroupedExperts":
        """Keep the experts ``indices`` (global, a subset of those held) only, in place; returns self."""
        pos = [self.indices.index(int(e)) for e in indices]
        for attr in ("gate_up", "down"):
            setattr(self, attr, getattr(self, attr).select(pos))
        return self

    # -- forward ------------------------------------------------------------------------------
    def forward(self, xs: torch.Tensor, counts) -> torch.Tensor | None:
        """Rows of ``xs`` grouped by expert (``counts[j]`` rows for the j-th expert held) through
        their experts; returns the outputs in the same order, or None when there are no rows."""
        # the one host sync: group sizes decide the padding of Wgrad's token axis and the segments
        sizes = [int(n) for n in (counts.tolist() if torch.is_tensor(counts) else counts)]
        if len(sizes) != len(self):
            raise ValueError(f"{len(sizes)} expert counts for {len(self)} experts")
        if not any(sizes):
            return None
        if not (self.gate_up.groupable() and self.down.groupable()):
            return self.forward_loop(xs, sizes)
        gate, up = self.gate_up(xs, sizes).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up, sizes)

    def forward_loop(self, xs: torch.Tensor, counts) -> torch.Tensor | None:
        """The reference: each expert with rows as its own SwiGLU on its rows, one after the other."""
        sizes = [int(n) for n in (counts.tolist() if torch.is_tensor(counts) else counts)]
        outs = []
        for j, chunk in enumerate(xs.split(sizes)):
            if chunk.shape[0]:
                gate, up = self.gate_up.expert_forward(j, chunk).chunk(2, dim=-1)
                outs.append(self.down.expert_forward(j, F.silu(gate) * up))
        return torch.cat(outs) if outs else None

    # -- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init: KeyedInit, std: float, out_std: float) -> None:
        """Each expert's slices keyed by its per-expert name: the values a separate SwiGLU per
        expert gets, on any layout."""
        for linear, s in ((self.gate_up, std), (self.down, out_std)):
            name, spec = init.name_of(linear, "weight"), placement_of(linear, "weight").per_expert()
            init.fill_normal_stack(linear.weight, spec, [per_expert_name(name, e) for e in linear.experts], s)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def expert_params(self) -> int:
        """Parameters of one routed expert (this rank's shard of it)."""
        return sum(p[0].numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"global experts {self.indices[0]}..{self.indices[-1]}" if self.indices else "no experts"


__all__ = ["GroupedExperts"]
