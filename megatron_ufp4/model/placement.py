"""Where each parameter's values live across ranks: one ``Placement`` record per parameter.

A module keeps ``placements: {attribute name: Placement}`` for its own parameters -- module
metadata, so it survives ``to_empty`` and ``deepcopy`` (which make new Parameter objects).
Modules declare what they know when they are built (a tensor-parallel layer its split, a
layer's stacked routed experts which experts they hold); the parallel model build adds what the layout
decides (``parallel_factory.attach_placements``: partial gradients); initialisation, data
parallelism, ZeRO, gradient clipping and checkpoints read them (``named_placements``).  A parameter without a record
is whole on every rank (a one-process model built without the parallel factory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Placement:
    """``global_shape``: the whole parameter.  ``dim``: the tensor-parallel split dim (None:
    every TP rank holds it whole), into ``num_shards`` equal shards of which this is
    ``shard``, each holding its slice of every one of ``parts`` fused parts ([gate; up]).
    ``partial_grad``: replicated over TP, but each TP rank's gradient is a partial sum to be
    summed over TP (sequence parallelism; a norm shared by heads split over TP).  ``experts``:
    a layer's routed experts stacked along dim 0 -- the global indices of the ones held, in
    order (``global_shape[0]`` is the layer's expert count); replicated over the
    expert-data-parallel ranks, not DP."""
    global_shape: tuple[int, ...]
    dim: int | None = None
    parts: int = 1
    num_shards: int = 1
    shard: int = 0
    partial_grad: bool = False
    experts: tuple[int, ...] | None = None

    def per_expert(self) -> "Placement":
        """The placement of one expert's slice of a stacked parameter (its own linear's)."""
        return Placement(self.global_shape[1:], None if self.dim is None else self.dim - 1, self.parts,
                         self.num_shards, self.shard, self.partial_grad)

    @property
    def matrix(self) -> bool:
        """A weight matrix (AdamW decays it): 2-D, per expert for stacked experts."""
        return len(self.global_shape) - (self.experts is not None) >= 2

    @property
    def split(self) -> bool:
        """Laid out for tensor parallelism (also at TP = 1: the checkpoint keys do not depend on TP)."""
        return self.dim is not None

    def global_coords(self, dim: int, local_size: int, device) -> torch.Tensor:
        """Global coordinates along ``dim`` of the local positions 0..local_size-1."""
        local = torch.arange(local_size, device=device, dtype=torch.int64)
        if dim != self.dim or self.num_shards == 1:
            return local
        n = local_size // self.parts  # this shard's rows of one part
        part_size = self.global_shape[dim] // self.parts
        return (local // n) * part_size + self.shard * n + local % n


def placement_of(module: nn.Module, attr: str) -> Placement:
    """``module.<attr>``'s placement (whole, when the module declares none)."""
    found = getattr(module, "placements", {}).get(attr)
    return found if found is not None else Placement(tuple(getattr(module, attr).shape))


def named_placements(modules) -> dict[str, Placement]:
    """``{fqn: Placement}`` of every parameter of a module or of a list of pipeline chunks
    (whose names are global), each parameter once, under ``named_parameters()``'s name."""
    out = {}
    for root in (list(modules) if isinstance(modules, (list, tuple)) else [modules]):
        for name, _ in root.named_parameters():
            prefix, _, attr = name.rpartition(".")
            out.setdefault(name, placement_of(root.get_submodule(prefix) if prefix else root, attr))
    return out


__all__ = ["Placement", "named_placements", "placement_of"]
