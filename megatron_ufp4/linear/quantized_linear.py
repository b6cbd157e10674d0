"""y = x W^T + b with Fprop, Dgrad and Wgrad run through an FP4 GEMM backend.

``QuantizedLinear`` is a drop-in ``nn.Linear``: the recipe decides, per GEMM and per
operand, format, block, RHT and rounding; layers the recipe keeps in high precision (and
the ``bf16`` recipe) run ``F.linear`` itself, so they match it exactly.

Under a precision schedule a module holds one ``LinearPhase`` per phase (recipe, whether
it quantizes, its ``GemmState``), all sharing its SR generator, SR seed and RHT signs, and
``recipe`` / ``quantized`` / ``gemms`` are those of the phase its ``StepContext`` names.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..fp4.hadamard import RHT
from ..fp4.recipes import GEMM_ROLES, Recipe
from .backends import get_backend
from .gemm import GemmState, reduction_multiple
from .linear_fn import NO_COLLECTIVES, LinearPlan, linear, linear_dtypes
from .step_context import StepContext


@dataclasses.dataclass(frozen=True)
class LinearPhase:
    """One precision phase of a module: its recipe, whether it quantizes, its GEMM runner."""
    recipe: Recipe
    quantized: bool
    gemms: GemmState


class PhasedLinear:
    """What a linear runs in the precision phase its ``step_context`` names: ``phase`` (one of
    ``self.phases``), its ``recipe``, whether it ``quantized`` and its ``gemms`` (a dense
    linear's ``GemmState``; stacked experts': one per expert)."""

    @property
    def phase(self):
        """The phase this step runs (the only one without a schedule)."""
        if len(self.phases) == 1:
            return self.phases[0]
        i = self.step_context.phase
        if not 0 <= i < len(self.phases):
            raise IndexError(f"precision phase {i}: this linear has phases 0..{len(self.phases) - 1}")
        return self.phases[i]

    @property
    def recipe(self) -> Recipe:
        return self.phase.recipe

    @property
    def quantized(self) -> bool:
        return self.phase.quantized

    @property
    def gemms(self):
        return self.phase.gemms


class QuantizedLinear(PhasedLinear, nn.Module):
    """Linear layer whose three GEMMs follow ``recipe``.

    layer_index / num_layers: position of the transformer layer, so the recipe can keep
    the first/last layers in high precision.  sr_seed: seed of this module's stochastic-
    rounding generator (saved and restored with the module's state dict) and of its SR
    keys in training.  step_context: the model's ``StepContext`` (shared by all its
    layers; a private one by default), read in forward for the SR position.  fused_parts:
    the output is that many fused parts ([gate; up]), each a GEMM reduction of its own in
    Dgrad (a tensor-parallel shard holds its slice of each).
    """
    hooks = NO_COLLECTIVES  # tensor-parallel subclasses talk to their group here

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 recipe: Recipe | dict | str | None = None, *, layer_index: int | None = None,
                 num_layers: int | None = None, sr_seed: int = 0,
                 backend: str = "emulated", collect_stats: bool = False, step_context: StepContext | None = None,
                 fused_parts: int = 1, device=None, dtype=None):
        super().__init__()
        self.fused_parts = int(fused_parts)
        self.step_context = step_context if step_context is not None else StepContext()
        self.in_features, self.out_features = in_features, out_features
        self.layer_index = layer_index  # metadata: the transformer layer (None outside one)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
        quantized = not recipe.is_high_precision_layer(layer_index, num_layers)
        if quantized:
            get_backend(backend)  # fail at construction, not at the first step
            self._check_dims(recipe)
        # the SR generator stays on the CPU whatever the weights' device: it only draws one
        # 31-bit key per quantized operand (no device sync), and its saved state is the same
        # ByteTensor on every device, so checkpoints load anywhere
        gemms = GemmState(recipe, RHT(recipe.rht_size, recipe.rht_seed),
                          torch.Generator(device="cpu").manual_seed(int(sr_seed)), backend, collect_stats,
                          sr_seed=int(sr_seed))
        self.phases: tuple[LinearPhase, ...] = (LinearPhase(recipe, quantized, gemms),)
        self.reset_parameters()

    # -- precision phases (PhasedLinear: phase, recipe, quantized, gemms) ---------------
    def add_phase(self, recipe: Recipe, num_layers: int | None) -> int:
        """Append a precision phase running ``recipe`` (the high-precision layer rule and the
        shape checks applied to it); returns its index.  Its GEMM runner is phase 0's with
        another recipe and its own telemetry log: the same SR generator, seed, RHT signs,
        TP amax reduction and SR indices, so a phase changes only how GEMMs quantize."""
        base = self.phases[0]
        quantized = not recipe.is_high_precision_layer(self.layer_index, num_layers)
        if quantized:
            self._check_dims(recipe)
            if any(recipe.gemm(g).rht for g in GEMM_ROLES) and (recipe.rht_size, recipe.rht_seed) != (
                    base.gemms.rht.size, base.recipe.rht_seed):
                raise ValueError(f"recipe {recipe.label()}: rotates with rht_size {recipe.rht_size} / rht_seed "
                                 f"{recipe.rht_seed}, but this linear's RHT signs are size {base.gemms.rht.size} / "
                                 f"seed {base.recipe.rht_seed}")
        gemms = dataclasses.replace(base.gemms, recipe=recipe, log={}, splits=self.gemm_splits(recipe))
        self.phases = (*self.phases, LinearPhase(recipe, quantized, gemms))
        return len(self.phases) - 1

    def _check_dims(self, recipe: Recipe):
        out_part = self.out_features // self.fused_parts  # Dgrad reduces over each fused part on its own
        for gemm, k in (("fprop", self.in_features), ("dgrad", out_part)):
            spec = recipe.gemm(gemm)
            need = reduction_multiple(spec, recipe.rht_size)
            if k % need:
                raise ValueError(f"QuantizedLinear({self.in_features}, {self.out_features}): {gemm} reduces over "
                                 f"{k}, which must be a multiple of {need} for recipe {recipe.label()}")
            w = spec.b.fmt
            if w is not None and w.block_2d and (self.in_features % w.block or out_part % w.block):
                raise ValueError(f"QuantizedLinear({self.in_features}, {self.out_features}): 2D {w.block}x{w.block} "
                                 f"weight blocks need both dims to be multiples of {w.block}")

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # no values to set; skipping saves a rank's meta build real time
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default; models re-init
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.weight, self.bias, self.gemms)

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     gemms: GemmState) -> torch.Tensor:
        """This linear's forward on another weight, bias and GEMM state of its shape and layout
        (one expert of a stacked ``ExpertLinear``, which keeps one such linear as its layout)."""
        if not self.quantized:
            return F.linear(x, weight, bias)
        return linear(x, weight, bias, self.plan(x, weight, gemms))

    def plan(self, x: torch.Tensor, weight: torch.Tensor | None = None, gemms: GemmState | None = None) -> LinearPlan:
        """What this forward (and its backward) runs: the current phase's GEMM state (FP4 when
        quantized, else high-precision GEMMs), the hooks, dtypes and the SR position."""
        out_dtype, hp_dtype = linear_dtypes(x, self.weight if weight is None else weight, self.quantized)
        return LinearPlan((gemms or self.gemms) if self.quantized else None, self.hooks, out_dtype, hp_dtype,
                          self.step_context.position, self.step_context.recomputing)

    def gemm_splits(self, recipe: Recipe) -> dict:
        """GEMMs that run in sub-GEMMs under ``recipe`` (none here; a strided tensor-parallel
        shard whose stochastically rounded operand spans its parts has some)."""
        return {}

    # -- telemetry ----------------------------------------------------------------------
    def telemetry(self) -> dict:
        """Per GEMM: what actually ran (format, rounding, RHT, backend, calls) and, when
        collect_stats is on, per-operand amax / alpha / NMSE / saturated / zeroed."""
        if not self.quantized:
            return {g: {"ran": "high precision (F.linear)"} for g in GEMM_ROLES}
        return {g: dict(v) for g, v in self.gemms.log.items()}

    def set_collect_stats(self, on: bool = True) -> None:
        for p in self.phases:
            p.gemms.collect_stats = on

    # -- state that must survive checkpoints: SR generator and RHT signs ---------------
    def get_extra_state(self):
        return {"sr_generator": self.gemms.generator.get_state(), "rht_signs": self.gemms.rht.signs.clone()}

    def set_extra_state(self, state):
        saved = state["sr_generator"].cpu()
        expected = self.gemms.generator.get_state().numel()
        if saved.dtype != torch.uint8 or saved.numel() != expected:
            raise ValueError(f"sr_generator state of {saved.numel()} bytes is not a CPU generator state "
                             f"({expected} bytes)")
        self.gemms.generator.set_state(saved)
        if not torch.equal(state["rht_signs"].cpu(), self.gemms.rht.signs):
            base = self.phases[0].recipe
            rht = RHT(base.rht_size, base.rht_seed, state["rht_signs"])
            for p in self.phases:  # one set of signs for every phase
                p.gemms.rht = rht

    def extra_repr(self) -> str:
        mode = self.recipe.name if self.quantized else "high precision"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"
