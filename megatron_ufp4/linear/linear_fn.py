"""The one autograd path of every linear layer (single-process and tensor-parallel).

    y  = reduce_output(gemm("fprop", gather_input(x), W)) + b
    dX = reduce_input_grad(gemm("dgrad", dY', W^T))         dY' = gather_output_grad(dY)
    dW = gemm("wgrad", dY'^T, gather_input(x)^T)             db = sum of the local dY

A single-process layer uses identity hooks; a column-parallel layer all-gathers its
sequence-parallel input and reduces its input gradient, a row-parallel layer reduces its
output and gathers a sequence-parallel output gradient (``CollectiveHooks`` subclasses in
parallel/tensor_parallel.py).  GEMMs return FP32 (or wider) partial results, so every
reduction over ranks happens before the one rounding to the activation dtype.

What a call runs is resolved once, in forward, into an immutable ``LinearPlan`` (the
phase's ``GemmState``, hooks, dtypes, the (step, micro-batch) position) kept on the
autograd context: backward may run after later micro-batches' forwards, and never calls
back into the module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gemm import GemmState

_HALF = (torch.bfloat16, torch.float16)


def linear_output_dtype(x: torch.Tensor) -> torch.dtype:
    """What a linear returns for input ``x``: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def linear_dtypes(x: torch.Tensor, weight: torch.Tensor, quantized: bool) -> tuple[torch.dtype, torch.dtype | None]:
    """The one dtype rule: (output dtype, high-precision GEMM input dtype or None for FP4).

    Output: the autocast dtype when autocast is on, else the input's dtype.  High-precision
    GEMMs take their inputs in the autocast dtype (else the promoted x / weight dtype), as
    ``F.linear`` does; FP4 GEMMs quantize from whatever they get and return FP32."""
    dev = x.device.type
    auto = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return linear_output_dtype(x), (None if quantized else (auto or torch.promote_types(x.dtype, weight.dtype)))


def high_precision_gemm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A @ B^T with inputs rounded to ``dtype`` and an FP32 (or wider) result: what a bf16
    GEMM accumulates before its final rounding, so partial sums over ranks are reduced
    before, not after, that rounding."""
    a, b = a.to(dtype), b.to(dtype)
    if dtype not in _HALF:
        return a @ b.t()
    if a.is_cuda:
        try:
            return torch.mm(a, b.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float().t()  # bf16/fp16 products are exact in fp32


class CollectiveHooks:
    """Where a linear talks to other ranks; the identity for a single-process layer."""

    def gather_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce_output(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def reduce_input_grad(self, dx: torch.Tensor) -> torch.Tensor:
        return dx

    def gather_output_grad(self, dy: torch.Tensor) -> torch.Tensor:
        return dy

    def __deepcopy__(self, memo):  # holds process-group handles, which cannot be copied
        return self


NO_COLLECTIVES = CollectiveHooks()


@dataclass(frozen=True)
class LinearPlan:
    """Everything one call needs besides tensors, fixed in forward: the GEMM state of the
    phase that runs (None: high precision), hooks, dtypes, SR position."""
    gemms: GemmState | None
    hooks: CollectiveHooks
    out_dtype: torch.dtype
    hp_dtype: torch.dtype | None  # set: high-precision GEMMs with inputs in this dtype
    position: tuple[int, int] | None
    recomputed: bool = False  # a forward re-run by activation recomputation: its GEMM is not logged again

    def run(self, gemm: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.hp_dtype is not None:
            return high_precision_gemm(a, b, self.hp_dtype)
        return self.gemms.run(gemm, a, b, self.position, record=not self.recomputed)

    def run_pair(self, first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Two GEMMs sharing a transposed A (Dgrad and Wgrad on dY), with ``run``'s results."""
        if self.hp_dtype is not None:
            return self.run(*first), self.run(*second)
        return self.gemms.run_pair(first, second, self.position)

    def finish(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """High precision: round to the GEMM's dtype first (as a single F.linear does)."""
        return (t.to(self.hp_dtype) if self.hp_dtype is not None else t).to(dtype)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan: LinearPlan):
        ctx.plan, ctx.has_bias = plan, bias is not None
        ctx.save_for_backward(x, weight)  # sequence parallel: the local slice, re-gathered in backward
        hooks = plan.hooks
        x_total = hooks.gather_input(x)
        with torch.autocast(x.device.type, enabled=False):
            y = plan.run("fprop", x_total.reshape(-1, x.shape[-1]), weight)
            y = hooks.reduce_output(y.reshape(*x_total.shape[:-1], weight.shape[0]))
            if bias is not None:
                y = y + (bias.to(plan.hp_dtype) if plan.hp_dtype is not None else bias).to(y.dtype)
        return y.to(plan.out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        hooks = plan.hooks
        dy_total = hooks.gather_output_grad(dy)
        dy2 = dy_total.reshape(-1, dy_total.shape[-1])
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:  # dY feeds both: quantized from one read
                x_total = hooks.gather_input(x)
                dx, dw = plan.run_pair(("dgrad", dy2, weight.t()),
                                       ("wgrad", dy2.t(), x_total.reshape(-1, x.shape[-1]).t()))
                dx = plan.finish(hooks.reduce_input_grad(dx.reshape(*dy_total.shape[:-1], weight.shape[1])), x.dtype)
                dw = plan.finish(dw, weight.dtype)
            elif ctx.needs_input_grad[0]:
                dx = plan.run("dgrad", dy2, weight.t()).reshape(*dy_total.shape[:-1], weight.shape[1])
                dx = plan.finish(hooks.reduce_input_grad(dx), x.dtype)
            elif ctx.needs_input_grad[1]:
                x_total = hooks.gather_input(x)
                dw = plan.finish(plan.run("wgrad", dy2.t(), x_total.reshape(-1, x.shape[-1]).t()), weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:  # local tokens: sequence-parallel biases are summed later
                db = plan.finish(dy.reshape(-1, dy.shape[-1]).float().sum(0), weight.dtype)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: LinearPlan) -> torch.Tensor:
    return _LinearFunction.apply(x, weight, bias, plan)
