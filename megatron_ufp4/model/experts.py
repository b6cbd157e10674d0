"""A layer's routed experts, run as grouped GEMMs.

``GroupedExperts`` holds the experts this process runs -- ``SwiGLU`` modules registered
under their *global* index, so parameter names (``experts.{e}.gate_up.weight``), the
expert recorded in their placements (data parallelism reads it), initialisation keys, SR seeds and
checkpoints are those of one module per expert -- and runs them together:

    gate_up: one grouped GEMM per GEMM over all experts     (linear/grouped.py)
    silu(gate) * up on all rows at once                     (elementwise)
    down:    one grouped GEMM per GEMM

bit for bit the per-expert loop (``forward_loop``, kept as the reference).  The experts'
``gate_up`` / ``down`` weights are consecutive views of one (E, 2f, h) / (E, h, f) tensor;
moving the module (``to``, ``to_empty``) re-packs them, and a forward re-packs weights that
something else made separate (``deepcopy``, ``load_state_dict(assign=True)``).  Layers the
recipe keeps in high precision run the loop; telemetry steps stay grouped (each expert's
statistics come from its own GEMM state, as the loop's would: ``GroupedPlan.record_stats``).

Expert parallelism keeps a subset (``select``): the same class, the rank's experts only.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..linear.grouped import can_group, grouped_linear, pack_parameters


class GroupedExperts(nn.Module):
    """Routed experts keyed by global index; ``self[e]`` is expert ``e``, iteration is in index order."""

    def __init__(self, experts: dict[int, nn.Module]):
        super().__init__()
        self.indices = sorted(int(e) for e in experts)
        for e in self.indices:
            self.add_module(str(e), experts[e])
        self.pack()

    def __getitem__(self, e: int) -> nn.Module:
        return self._modules[str(int(e))]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def select(self, indices: Sequence[int]) -> "GroupedExperts":
        """A container of the experts ``indices`` only (same modules, their weights re-packed)."""
        return type(self)({int(e): self[e] for e in indices})

    def pack(self) -> None:
        """Store the experts' gate_up and down weights as views of one tensor each."""
        if len(self):
            for attr in ("gate_up", "down"):
                pack_parameters([getattr(ex, attr).weight for ex in self])

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)  # makes every parameter separate again
        self.pack()
        return out

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
        experts = list(self)
        ups, downs = [ex.gate_up for ex in experts], [ex.down for ex in experts]
        if not (can_group(ups) and can_group(downs)):
            return self.forward_loop(xs, sizes)
        gate, up = grouped_linear(ups, xs, sizes).chunk(2, dim=-1)
        return grouped_linear(downs, F.silu(gate) * up, sizes)

    def forward_loop(self, xs: torch.Tensor, counts) -> torch.Tensor | None:
        """The reference: each expert with rows called on its rows, one after the other."""
        sizes = [int(n) for n in (counts.tolist() if torch.is_tensor(counts) else counts)]
        outs = [ex(chunk) for ex, chunk in zip(self, xs.split(sizes)) if chunk.shape[0]]
        return torch.cat(outs) if outs else None

    def extra_repr(self) -> str:
        return f"global experts {self.indices[0]}..{self.indices[-1]}" if self.indices else "no experts"


__all__ = ["GroupedExperts"]
