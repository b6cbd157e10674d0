"""The one place where the model's attention / MLP / expert linears are made.

Model code never constructs those linears itself; it calls a factory

    factory(in_features, out_features, *, kind, layer_index, name, bias=False, parts=1, in_moe=False)
    factory.experts(in_features, out_features, *, kind, layer_index, name, proj, num_experts, ...)

(the second: one linear of a layer's routed experts, stacked, for the experts
``factory.local_experts(num_experts)`` says this process holds)

and reads its ``step_context`` (shared by every layer it builds, see linear/step_context.py).

``kind`` is "column" (the output dimension may be split: fused qkv, fused gate+up) or
"row" (the input dimension may be split: attention output, MLP/expert down).  The
single-process ``LinearFactory`` ignores it; a tensor-parallel factory returns
Megatron-style column/row-parallel layers from the same call sites.  ``name`` is the
module's path inside its transformer block (e.g. "attn.qkv", "mlp.shared.down"), so
``f"layers.{layer_index}.{name}"`` is its state-dict prefix (used in messages only).  The
rest is explicit metadata a parallel factory needs: ``parts`` > 1 for a column linear whose
output is that many fused equal parts (SwiGLU's [gate; up]: each part is sharded on its
own), ``in_moe`` for the linears of an MoE layer (their tokens are flattened and routed).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Protocol

from torch import nn

from ..fp4.recipes import Recipe
from ..fp4.schedule import PrecisionSchedule
from ..linear import ExpertLinear, QuantizedLinear, StepContext
from .placement import placement_of

KINDS = ("column", "row")


class LinearFactoryProtocol(Protocol):
    step_context: StepContext

    def __call__(self, in_features: int, out_features: int, *, kind: str, layer_index: int, name: str,
                 bias: bool = False, parts: int = 1, in_moe: bool = False) -> nn.Module:
        ...

    def local_experts(self, num_experts: int) -> range:
        ...

    def experts(self, in_features: int, out_features: int, *, kind: str, layer_index: int, name: str, proj: str,
                num_experts: int, experts=None, bias: bool = False, parts: int = 1) -> nn.Module:
        ...


def derive_sr_seed(base_seed: int, layer_index: int, name: str) -> int:
    """A stable 63-bit seed for one module's stochastic rounding.

    blake2b of "base_seed/layer_index/name" (never Python's salted ``hash()``), so the same
    module gets the same seed in every process, run and parallel layout; 63 bits keep
    collisions away even with tens of thousands of expert linears.
    """
    digest = hashlib.blake2b(f"{int(base_seed)}/{int(layer_index)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class LinearFactory:
    """Builds ``QuantizedLinear`` modules that follow one FP4 ``recipe``.

    num_layers must be the model's layer count: the recipe's bf16_first / bf16_last
    fractions are resolved against it.  ``seed`` is the base of every module's SR seed.
    ``step_context``: the model's (a new one by default).  ``schedule``: a precision schedule
    whose base is ``recipe``; every linear then gets each phase's GEMM plan, resolved here
    once (``add_phase``), and runs the one its ``step_context.phase`` names.
    """

    def __init__(self, recipe: Recipe | dict | str | None, num_layers: int, *,
                 backend: str = "emulated", seed: int = 0, collect_stats: bool = False,
                 step_context: StepContext | None = None, schedule: PrecisionSchedule | None = None,
                 device=None, dtype=None):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"LinearFactory.num_layers must be the model's positive layer count (got {num_layers!r})")
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
        self.schedule = schedule if schedule is not None else PrecisionSchedule.single(self.recipe)
        if self.schedule.base != self.recipe:
            raise ValueError(f"LinearFactory: the schedule's base recipe {self.schedule.base.label()} is not the "
                             f"recipe {self.recipe.label()}")
        self.num_layers = num_layers
        self.backend = backend
        self.seed = int(seed)
        self.collect_stats = collect_stats
        self.step_context = step_context if step_context is not None else StepContext()
        self.device, self.dtype = device, dtype

    def sr_seed(self, layer_index: int, name: str) -> int:
        return derive_sr_seed(self.seed, layer_index, name)

    @staticmethod
    def check_kind(kind: str, name: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"linear {name!r}: kind must be one of {KINDS} (got {kind!r})")

    def __call__(self, in_features: int, out_features: int, *, kind: str, layer_index: int, name: str,
                 bias: bool = False, parts: int = 1, in_moe: bool = False) -> nn.Module:
        self.check_kind(kind, name)
        return self.build(in_features, out_features, kind=kind, layer_index=layer_index, name=name, bias=bias,
                          parts=parts, in_moe=in_moe, device=self.device)

    def build(self, in_features: int, out_features: int, *, kind: str, layer_index: int, name: str, bias: bool,
              parts: int, in_moe: bool, device) -> QuantizedLinear:
        """One linear on ``device`` (``__call__``'s, or the meta device for an expert layout)."""
        return self.with_phases(QuantizedLinear(in_features, out_features, bias, self.recipe, layer_index=layer_index,
                                                num_layers=self.num_layers, sr_seed=self.sr_seed(layer_index, name),
                                                backend=self.backend, collect_stats=self.collect_stats,
                                                step_context=self.step_context, device=device,
                                                dtype=self.dtype), f"layers.{layer_index}.{name}")

    # -- routed experts -----------------------------------------------------------------
    def local_experts(self, num_experts: int) -> range:
        """The routed experts (global indices) of a layer of ``num_experts`` this process
        builds: all of them (an expert-parallel factory: its rank's share)."""
        return range(num_experts)

    def experts(self, in_features: int, out_features: int, *, kind: str, layer_index: int, name: str, proj: str,
                num_experts: int, experts=None, bias: bool = False, parts: int = 1) -> ExpertLinear:
        """One linear (``proj``: "gate_up", "down") of the routed experts ``experts`` (default:
        ``local_experts``) of an MoE layer, stacked.  Expert e's linear is named
        ``f"{name}.{e}.{proj}"`` -- its SR seed and its checkpoint keys -- and laid out as
        ``__call__`` would make it alone (built once, on the meta device, for all of them)."""
        self.check_kind(kind, name)
        experts = tuple(self.local_experts(num_experts) if experts is None else experts)
        layout = self.build(in_features, out_features, kind=kind, layer_index=layer_index, name=f"{name}.{proj}",
                            bias=bias, parts=parts, in_moe=True, device="meta")
        seeds = [self.sr_seed(layer_index, f"{name}.{e}.{proj}") for e in experts]
        placements = {attr: dataclasses.replace(p, global_shape=(num_experts, *p.global_shape),
                                                dim=None if p.dim is None else p.dim + 1, experts=experts)
                      for attr, p in ((a, placement_of(layout, a)) for a, _ in layout.named_parameters())}
        return ExpertLinear(layout, experts, num_experts, seeds, placements=placements, device=self.device,
                            dtype=self.dtype)

    def with_phases(self, module: QuantizedLinear, full_name: str) -> QuantizedLinear:
        """``module`` with the GEMM plan of every schedule phase after the base (a shape a
        phase's recipe cannot run is a one-line error naming the phase and the module)."""
        for phase in self.schedule.phases[1:]:
            try:
                module.add_phase(phase.recipe, self.num_layers)
            except ValueError as e:
                raise ValueError(f"{phase.where}: {full_name}: {e}") from None
        return module

    def __repr__(self) -> str:
        return (f"LinearFactory(recipe={self.recipe.name}, num_layers={self.num_layers}, backend={self.backend}, "
                f"seed={self.seed})")
