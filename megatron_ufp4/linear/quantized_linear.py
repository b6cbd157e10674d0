"""y = x W^T + b with Fprop, Dgrad and Wgrad run through an FP4 GEMM backend.

``QuantizedLinear`` is a drop-in ``nn.Linear``: the recipe decides, per GEMM and per
operand, format, block, RHT and rounding; layers the recipe keeps in high precision (and
the ``bf16`` recipe) run ``F.linear`` itself, so they match it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..fp4.hadamard import RHT
from ..fp4.recipes import GEMM_ROLES, Recipe
from ..fp4.sr_random import derive_key, sr_position

GEMM_ORDER = {g: i for i, g in enumerate(GEMM_ROLES)}
from .backends import get_backend


@dataclass
class GemmContext:
    """Everything the autograd function needs besides tensors (one per module)."""
    recipe: Recipe
    rht: RHT
    generator: torch.Generator
    backend_name: str
    collect_stats: bool = False
    amax_reduce: Callable | None = None  # set by tensor-parallel wrappers for NVFP4 tensor amax
    sr_index: dict = field(default_factory=dict)  # gemm -> (SRIndex of A, of B), set for sharded operands
    sr_seed: int = 0
    position: tuple[int, int] | None = None  # (step, micro-batch) the current GEMMs belong to
    log: dict = field(default_factory=dict)  # gemm -> what actually ran (+ stats)

    def run(self, gemm: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        spec = self.recipe.gemm(gemm)
        entry = self.log.setdefault(gemm, {"calls": 0})
        entry["calls"] += 1
        if not spec.quantized:
            entry.update(ran="high precision", backend="torch")
            return a.float() @ b.float().T
        ra, rb = GEMM_ROLES[gemm]
        entry.update(backend=self.backend_name, rht=f"{self.rht.size}" if spec.rht else "off",
                     ran={ra: f"{spec.a.fmt.describe()} {spec.a.rounding}",
                          rb: f"{spec.b.fmt.describe()} {spec.b.rounding}"})
        stats = {} if self.collect_stats else None
        keys = (None, None)
        if self.position is not None:  # keys from where we are in training, not from generator draws
            g = GEMM_ORDER[gemm]
            keys = (derive_key(self.sr_seed, *self.position, g, 0), derive_key(self.sr_seed, *self.position, g, 1))
        out = get_backend(self.backend_name).gemm(a, b, spec, self.rht, self.generator, stats, self.amax_reduce,
                                                  self.sr_index.get(gemm, (None, None)), keys)
        if stats is not None:
            entry["stats"] = {ra: stats["a"], rb: stats["b"]}
        return out


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gctx: GemmContext, out_dtype):
        ctx.gctx, ctx.has_bias = gctx, bias is not None
        gctx.position = ctx.sr_position = sr_position()  # backward may run after other micro-batches
        ctx.save_for_backward(x, weight)
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            y = gctx.run("fprop", x2, weight)
            if bias is not None:
                y = y + bias.float()
        return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        gctx = ctx.gctx
        gctx.position = ctx.sr_position
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = gctx.run("dgrad", dy2, weight.t()).to(x.dtype).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                dw = gctx.run("wgrad", dy2.t(), x.reshape(-1, x.shape[-1]).t()).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2.float().sum(0).to(weight.dtype)
        return dx, dw, db, None, None


class QuantizedLinear(nn.Module):
    """Linear layer whose three GEMMs follow ``recipe``.

    layer_index / num_layers: position of the transformer layer, so the recipe can keep
    the first/last layers in high precision.  sr_seed: seed of this module's stochastic-
    rounding generator (saved and restored with the module's state dict).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Recipe | dict | str | None = None,
                 *, layer_index: int | None = None, num_layers: int | None = None, sr_seed: int = 0,
                 backend: str = "emulated", collect_stats: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
        self.recipe = recipe
        self.quantized = not recipe.is_high_precision_layer(layer_index, num_layers)
        if self.quantized:
            get_backend(backend)  # fail at construction, not at the first step
            self._check_dims()
        gen_device = device if device is not None and torch.device(device).type != "meta" else "cpu"
        self.ctx = GemmContext(recipe, RHT(recipe.rht_size, recipe.rht_seed),
                               torch.Generator(device=gen_device).manual_seed(int(sr_seed)), backend, collect_stats,
                               sr_seed=int(sr_seed))
        self.reset_parameters()

    def _check_dims(self):
        for gemm, k in (("fprop", self.in_features), ("dgrad", self.out_features)):
            spec = self.recipe.gemm(gemm)
            need = max(spec.a.fmt.block, spec.b.fmt.block, self.recipe.rht_size if spec.rht else 1)
            if k % need:
                raise ValueError(f"QuantizedLinear({self.in_features}, {self.out_features}): {gemm} reduces over "
                                 f"{k}, which must be a multiple of {need} for recipe {self.recipe.name}")
            w = spec.b.fmt
            if w.block_2d and (self.in_features % w.block or self.out_features % w.block):
                raise ValueError(f"QuantizedLinear({self.in_features}, {self.out_features}): 2D {w.block}x{w.block} "
                                 f"weight blocks need both dims to be multiples of {w.block}")

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default; models re-init
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight, self.bias)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if self.ctx.generator.device != x.device:
            self._move_generator(x.device)
        return _QuantizedLinearFn.apply(x, self.weight, self.bias, self.ctx, out_dtype)

    def _move_generator(self, device):
        state = self.ctx.generator.get_state() if self.ctx.generator.device.type == device.type else None
        g = torch.Generator(device=device)
        g.set_state(state) if state is not None else g.manual_seed(self.ctx.generator.initial_seed())
        self.ctx.generator = g

    # -- telemetry ----------------------------------------------------------------------
    def telemetry(self) -> dict:
        """Per GEMM: what actually ran (format, rounding, RHT, backend, calls) and, when
        collect_stats is on, per-operand amax / alpha / NMSE / saturated / zeroed."""
        if not self.quantized:
            return {g: {"ran": "high precision (F.linear)"} for g in GEMM_ROLES}
        return {g: dict(v) for g, v in self.ctx.log.items()}

    def set_collect_stats(self, on: bool = True) -> None:
        self.ctx.collect_stats = on

    # -- state that must survive checkpoints: SR generator and RHT signs ---------------
    def get_extra_state(self):
        return {"sr_generator": self.ctx.generator.get_state(), "rht_signs": self.ctx.rht.signs.clone()}

    def set_extra_state(self, state):
        self.ctx.generator.set_state(state["sr_generator"].cpu() if self.ctx.generator.device.type == "cpu"
                                     else state["sr_generator"])
        if not torch.equal(state["rht_signs"].cpu(), self.ctx.rht.signs):
            self.ctx.rht = RHT(self.recipe.rht_size, self.recipe.rht_seed, state["rht_signs"])

    def extra_repr(self) -> str:
        mode = self.recipe.name if self.quantized else "high precision"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"


def precision_table(model: nn.Module) -> str:
    """One line per transformer layer: which recipe its quantized linears run (from the modules)."""
    rows: dict[str, set] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear):
            layer = name.split(".")[1] if name.startswith("layers.") else name
            rows.setdefault(layer, set()).add(mod.recipe.name if mod.quantized else "high precision")
    lines = ["layer  linears run as"]
    for layer, kinds in rows.items():
        lines.append(f"{layer:<6} {', '.join(sorted(kinds))}")
    return "\n".join(lines)
