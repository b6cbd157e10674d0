"""A layer's routed experts' linear (``ExpertLinear``) run as one grouped GEMM per GEMM.

``grouped_linear(experts, x, sizes)`` is, bit for bit, ``cat([experts.expert_forward(j, x_j)])``
over the row groups ``x_j`` of ``x`` (``sizes[j]`` rows each, in expert order), forward and
backward -- each expert run as its own FP4 linear (``QuantizedLinear`` or a tensor-parallel
one) would run it -- but each of the
three GEMMs quantizes its two operands with one call each (``GroupedOperand``) and
multiplies them with one grouped GEMM:

| GEMM  | A (grouped)                          | B (grouped)                 | output      |
|-------|--------------------------------------|-----------------------------|-------------|
| fprop | x (T, in), rows by expert            | W (E*out, in), rows         | (T, out)    |
| dgrad | dY (T, out), rows by expert          | W^T (E*in, out), rows       | (T, in)     |
| wgrad | dY^T (out, sum T_e'), K by expert    | x^T (in, sum T_e'), K       | (E, out, in)|

``T_e'`` is ``T_e`` padded on its own to the block / RHT multiple, as each expert's
``GemmState`` pads it, so no block crosses two experts.  Every expert keeps its own SR
keys (its module seed, or draws from its own generator, only when it has rows, as the loop
only calls those), the SR indices its module would use (``GemmState.sr_index`` and the
parts of a fused column shard, ``GemmState.splits``), its own NVFP4 tensor amax (all-reduced over TP
as one vector), and its RHT.  A GEMM the loop runs in parts (a strided TP shard whose SR
operand spans parts) runs in the same parts here, joined the same way.

The weights are the experts' stacked (E, out, in) Parameter (``ExpertLinear``, one per
projection), which the grouped GEMMs read without a copy; its gradient is the (E, out, in)
grouped Wgrad, zero for an expert without rows (as Megatron-LM's grouped GEMM gives it).

Specification: docs/backends.md ("Grouped operands"), docs/parallel.md.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from ..fp4.grouped import Segments
from .backends import get_backend
from .linear_fn import linear_output_dtype


class GroupedPlan:
    """What one grouped call runs, fixed in forward: the experts' GEMM states (the lead's
    recipe, RHT, SR indices and splits stand for all: one layout), row counts, hooks, output
    dtype, SR position, the stacked weight and bias.  Holds no module."""

    def __init__(self, experts, sizes: Sequence[int], x: torch.Tensor):
        self.states, self.sizes = tuple(experts.gemms), tuple(int(n) for n in sizes)
        if len(self.sizes) != len(self.states):
            raise ValueError(f"{len(self.sizes)} row counts for {len(self.states)} experts")
        self.lead, self.recipe, self.hooks = self.states[0], experts.recipe, experts.hooks
        self.backend = get_backend(self.lead.backend_name)
        self.position = experts.step_context.position  # read in forward, kept for backward (as the loop does)
        self.recomputed = experts.step_context.recomputing  # a recomputed forward logs no GEMM again
        self.out_dtype = linear_output_dtype(x)
        self.weight, self.bias = experts.weight, experts.bias

    def _keys(self, gemm: str):
        """Per expert (key A, key B); an expert without rows draws nothing (the loop skips it)."""
        out = []
        for state, n in zip(self.states, self.sizes):
            if n:
                # a telemetry step logs through the expert's own GEMM (record_stats); a recomputed forward not again
                if not (self.recomputed and gemm == "fprop") and not state.collect_stats:
                    state.record(gemm)
                out.append(state.sr_keys(gemm, self.position))
            else:
                out.append((0, 0))
        return out

    def _operand(self, gemm, which, t, seg, keys):
        """Every expert's operand ``which`` in one, prepared as each expert's own (``GemmState.operand``)."""
        key = tuple(k["ab".index(which)] for k in keys)
        return self.backend.quantize_grouped(self.lead.operand(gemm, which, t, key, seg))

    def record_stats(self, gemm: str, keys, a_of, b_of) -> None:
        """Telemetry steps: each expert's GEMM log and per-operand statistics, made by its own
        ``GemmState.run`` with this call's SR keys on the operands the per-expert loop gives it
        (``a_of(e, start, rows)``, ``b_of(...)``: the same tensors, layouts included), so the same
        positions, amax and sub-GEMMs, and the same numbers to the last bit; its product is dropped."""
        start = 0
        for e, (state, n) in enumerate(zip(self.states, self.sizes)):
            if n:
                state.run(gemm, a_of(e, start, n), b_of(e, start, n), self.position, keys=keys[e])
            start += n

    def gemm(self, gemm: str, a: torch.Tensor, b: torch.Tensor, a_seg: Segments, b_seg: Segments,
             loop_operands=None) -> torch.Tensor:
        """The quantized GEMM ``gemm`` of every expert: (T, N) for row groups, (E, M, N) for K groups.
        ``loop_operands``: (a_of, b_of) of ``record_stats``, used on telemetry steps."""
        split = self.lead.splits.get(gemm)
        keys = self._keys(gemm)
        if self.lead.collect_stats and not (self.recomputed and gemm == "fprop"):
            self.record_stats(gemm, keys, *loop_operands)
        qa = self._operand(gemm, "a", a, a_seg, keys)
        qb = self._operand(gemm, "b", b, b_seg, keys)
        e = len(self.states)
        mm = functools.partial(self.backend.grouped_matmul, sizes=a_seg.sizes if gemm != "wgrad" else b_seg.sizes)
        if gemm == "wgrad":  # K groups: (E, M, N); a split cuts A's rows ("cat_rows")
            if split is None:
                return mm(qa, qb)
            return torch.cat([mm(qa[p.a_rows], qb) for p in split.parts], dim=1)
        qb3 = qb.view(e, -1, qb.shape[-1])
        if split is None:
            return mm(qa, qb3)
        if split.combine == "cat_cols":  # B's rows in parts (fprop of a strided column shard)
            return torch.cat([mm(qa, qb3[:, p.b_rows]) for p in split.parts], dim=1)
        # "sum": K in parts (dgrad), partial products added in part order as GemmSplit.join does
        return functools.reduce(torch.add, [mm(qa[:, p.a_cols].contiguous(), qb3[:, :, p.b_cols].contiguous())
                                            for p in split.parts])

    def padded_tokens(self) -> tuple[int, ...]:
        """Each expert's tokens padded on their own, as its dense Wgrad pads them."""
        return tuple(self.lead.padded("wgrad", n) for n in self.sizes)

    def token_columns(self, t: torch.Tensor, padded: Sequence[int]) -> torch.Tensor:
        """(T, c) rows grouped by expert -> (c, sum padded): each expert's rows as columns,
        zero-padded on their own (the per-expert GemmState's padding)."""
        starts, src = 0, []
        for n, p in zip(self.sizes, padded):
            src.append(torch.arange(starts, starts + n, device=t.device))
            starts += p
        dst = torch.cat(src) if src else torch.zeros(0, dtype=torch.long, device=t.device)
        # rows scattered (contiguous copies), then one transpose: faster on CPU than scattering columns
        return t.new_zeros((sum(padded), t.shape[1])).index_copy_(0, dst, t).t().contiguous()


class _GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, call: GroupedPlan, weight, bias):
        ctx.call = call
        ctx.save_for_backward(x)
        e, w = len(call.states), weight.detach()
        with torch.autocast(x.device.type, enabled=False):
            y = call.gemm("fprop", x, w.reshape(-1, w.shape[-1]), Segments(0, call.sizes),
                          Segments(0, (w.shape[1],) * e), (lambda i, s, n: x[s:s + n], lambda i, s, n: w[i]))
            y = call.hooks.reduce_output(y)
            if bias is not None:  # elementwise, as each expert's y + b
                rows = torch.repeat_interleave(torch.arange(e, device=x.device),
                                               torch.tensor(call.sizes, device=x.device))
                y = y + bias.detach()[rows].to(y.dtype)
        return y.to(call.out_dtype)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        call = ctx.call
        e, w = len(call.states), call.weight.detach()
        dy2 = call.hooks.gather_output_grad(dy)
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                wt = w.transpose(1, 2).reshape(-1, w.shape[1])  # each W_e^T (in, out), blocked along out
                dx = call.gemm("dgrad", dy2, wt, Segments(0, call.sizes), Segments(0, (w.shape[2],) * e),
                               (lambda i, s, n: dy2[s:s + n], lambda i, s, n: w[i].t()))
                dx = call.hooks.reduce_input_grad(dx).to(x.dtype)
            if ctx.needs_input_grad[2]:
                padded = call.padded_tokens()
                seg = Segments(1, padded)
                dw = call.gemm("wgrad", call.token_columns(dy2, padded), call.token_columns(x, padded), seg, seg,
                               (lambda i, s, n: dy2[s:s + n].t(), lambda i, s, n: x[s:s + n].t()))
                dw = dw.to(w.dtype)
            if call.bias is not None and ctx.needs_input_grad[3]:  # per expert, as each expert sums its local dY
                db = torch.zeros(call.bias.shape, dtype=w.dtype, device=dy.device)
                start = 0
                for i, n in enumerate(call.sizes):
                    if n:
                        db[i] = dy[start:start + n].float().sum(0).to(w.dtype)
                    start += n
        return dx, None, dw, db


def grouped_linear(experts, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``experts`` (an ``ExpertLinear``) on the rows of ``x`` grouped by expert as grouped
    GEMMs (see module doc); ``sizes``: host row counts."""
    return _GroupedLinearFunction.apply(x, GroupedPlan(experts, sizes, x), experts.weight, experts.bias)


__all__ = ["GroupedPlan", "grouped_linear"]
