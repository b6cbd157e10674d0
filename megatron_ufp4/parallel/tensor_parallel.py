"""Megatron-style tensor-parallel linears (+ sequence parallelism) on the FP4 GEMM path.

Column-parallel linear  y_r = x W_r^T       W_r = rows [r*out/tp, (r+1)*out/tp) of W
Row-parallel linear     y   = sum_r x_r W_r^T   W_r = columns [r*in/tp, (r+1)*in/tp), x_r the
                        matching slice of x (the output of a column-parallel layer)

Both subclass ``QuantizedLinear`` and run its one autograd path (linear/linear_fn.py) with
their collectives as hooks: the weight parameter *is* the local shard, the recipe and its
per-layer high-precision rule are the same, and every rank quantizes its shard along the
reduction axis of each GEMM exactly as the unsplit layer would:

- shards must be whole quantization blocks / RHT tiles (checked at construction, with a
  one-line error), so a shard's blocks are blocks of the full tensor;
- stochastic rounding draws are a hash of (key, global element index): each sharded
  operand has its ``SRIndex`` (offset in the full tensor), and every TP rank seeds its
  layer like the single-process module, so the draws equal the unsplit layer's;
- NVFP4's per-tensor amax is all-reduced (MAX) over the TP group by the layer's
  ``GemmState``, so the second-level scale is the full tensor's;
- partial GEMM outputs (row-parallel Fprop, column-parallel Dgrad) are reduced in FP32
  before being cast to the activation dtype.

Consequences (see tests/test_tensor_parallel.py): a column-parallel Fprop and Wgrad and a
row-parallel Dgrad and Wgrad are the matching slices of the single-process results (no
reduction crosses ranks); row-parallel Fprop and column-parallel Dgrad differ only by the
FP32 summation order of the TP partial sums.

Sequence parallelism (``state.sequence_parallel``): activations outside the column->row
regions are [batch, seq/tp, hidden]; a column-parallel layer all-gathers the sequence in
forward (reduce-scatters its FP32 input gradient in backward), a row-parallel layer
reduce-scatters its FP32 partial output (all-gathers dY in backward).  Parameters that
stay replicated (norms, row-parallel biases) then see only local tokens, so their
gradients are summed over TP with ``sync_sequence_parallel_grads``.

A fused column layer of ``parts`` S (S=2: the SwiGLU [gate; up]) holds, on rank r,
[part_0 shard r; ...; part_{S-1} shard r].  Its shard is not one contiguous block of the
full tensor, so a GEMM whose stochastically rounded operand spans the parts runs per part
(``GemmSplit``), every part with the whole operand's key and tensor amax and its own
global offset: bitwise the unsplit layer's rounding.

Specification: docs/parallel.md.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..fp4.recipes import Recipe
from ..fp4.sr_random import SRIndex
from ..linear.gemm import GemmPart, GemmSplit, reduction_multiple
from ..linear.linear_fn import CollectiveHooks, linear
from ..linear.quantized_linear import QuantizedLinear
from ..model.placement import Placement
from .mappings import SEQ_DIM, all_gather, all_reduce, gather_from_tp, reduce_scatter, scatter_to_tp
from .state import ParallelState


def tp_info(state: ParallelState | None):
    """(tp size, tp rank, tp group) of ``state``; (1, 0, None) for a single process."""
    if state is None:
        return 1, 0, None
    return state.tp, state.tp_rank, state.group("tp")


class GroupHandle:
    """A process-group reference that ``copy.deepcopy`` shares instead of copying (process
    groups cannot be copied), so a TP model can still be deep-copied (e.g. for EMA)."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class _AmaxAllReduce(GroupHandle):
    """GemmState.amax_reduce: all-reduce(MAX) of an NVFP4 tensor amax over the TP group."""

    def __call__(self, amax: torch.Tensor) -> torch.Tensor:
        return all_reduce(amax, self.group, op=dist.ReduceOp.MAX)


class TPGroupMixin:
    """TP coordinates of a module: ``tp``, ``tp_rank``, ``tp_group``, ``sequence_parallel``."""

    @property
    def tp_group(self):
        return self._tp_handle.group

    def _set_tp(self, state: ParallelState | None, sequence_parallel: bool | None):
        self.tp, self.tp_rank, group = tp_info(state)
        self._tp_handle = GroupHandle(group)
        self.sequence_parallel = bool(state.sequence_parallel if (sequence_parallel is None and state is not None)
                                      else sequence_parallel)


class _TPHooks(CollectiveHooks):
    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sequence_parallel = group, sequence_parallel


class ColumnHooks(_TPHooks):
    """Column parallel: gather a sequence-parallel input; reduce the FP32 input gradient."""

    def gather_input(self, x):
        return all_gather(x, SEQ_DIM, self.group) if self.sequence_parallel else x

    def reduce_input_grad(self, dx):
        return reduce_scatter(dx, SEQ_DIM, self.group) if self.sequence_parallel else all_reduce(dx, self.group)


class RowHooks(_TPHooks):
    """Row parallel: reduce the FP32 partial output; gather a sequence-parallel output gradient."""

    def reduce_output(self, y):
        return reduce_scatter(y, SEQ_DIM, self.group) if self.sequence_parallel else all_reduce(y, self.group)

    def gather_output_grad(self, dy):
        return all_gather(dy, SEQ_DIM, self.group) if self.sequence_parallel else dy


def _shard_need(recipe: Recipe, gemm: str) -> int:
    return reduction_multiple(recipe.gemm(gemm), recipe.rht_size)


def _weight_2d_block(recipe: Recipe) -> int:
    w = recipe.fprop.b.fmt
    return w.block if (w is not None and w.block_2d) else 1


def _resolve_recipe(recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)


class _TensorParallelLinear(TPGroupMixin, QuantizedLinear):
    def _setup_tp(self, state, name, sequence_parallel, hooks_cls):
        self._set_tp(state, sequence_parallel)
        self.name = name
        self.hooks = hooks_cls(self.tp_group, self.sequence_parallel)
        if self.tp > 1 and self.tp_group is not None:
            self.gemms.amax_reduce = _AmaxAllReduce(self.tp_group)

    def forward_with(self, x, weight, bias, gemms):
        return linear(x, weight, bias, self.plan(x, weight, gemms))  # high precision too: the hooks reduce


class ColumnParallelLinear(_TensorParallelLinear):
    """y = x W^T + b with W's output rows split over the TP group; returns the local output
    shard (``gather_output=True`` all-gathers it).  ``partition_stride`` S: the output is S
    fused parts ([gate; up] for S=2) and each rank holds its slice of every part.

    With sequence parallelism the input is [batch, seq/tp, in] and is all-gathered along
    the sequence; the output is [batch, seq, out/tp].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe=None, *,
                 state: ParallelState | None = None, layer_index: int | None = None, num_layers: int | None = None,
                 sr_seed: int = 0, backend: str = "emulated", partition_stride: int = 1, gather_output: bool = False,
                 sequence_parallel: bool | None = None, name: str | None = None, collect_stats: bool = False,
                 step_context=None, device=None, dtype=None):
        recipe = _resolve_recipe(recipe)
        tp, rank, _ = tp_info(state)
        what = f"ColumnParallelLinear{f' {name!r}' if name else ''} ({in_features} -> {out_features}) at TP={tp}"
        stride = int(partition_stride)
        if stride < 1:
            raise ValueError(f"{what}: partition_stride must be >= 1 (got {partition_stride})")
        if out_features % (tp * stride):
            raise ValueError(f"{what}: out_features={out_features} is not divisible by TP x partition_stride = "
                             f"{tp} x {stride}")
        if not recipe.is_high_precision_layer(layer_index, num_layers):
            need = max(_shard_need(recipe, "dgrad"), _weight_2d_block(recipe))
            part = out_features // (tp * stride)
            if part % need:
                raise ValueError(f"{what}: each rank's {'part ' if stride > 1 else ''}shard of {part} output rows "
                                 f"must be a multiple of {need} (recipe {recipe.name} quantizes Dgrad in blocks/RHT "
                                 f"tiles of {need} along out_features)")
        super().__init__(in_features, out_features // tp, bias, recipe, layer_index=layer_index,
                         num_layers=num_layers, sr_seed=sr_seed, backend=backend, collect_stats=collect_stats,
                         step_context=step_context, fused_parts=stride, device=device, dtype=dtype)
        self._setup_tp(state, name, sequence_parallel, ColumnHooks)
        self.full_in_features, self.full_out_features = in_features, out_features
        self.gather_output = gather_output
        self.placements = {"weight": Placement((out_features, in_features), 0, stride, tp, self.tp_rank)}
        if self.bias is not None:
            self.placements["bias"] = Placement((out_features,), 0, stride, tp, self.tp_rank)
        off, full = self.tp_rank * self.out_features, out_features
        # where each (2-D) GEMM operand of this shard sits in the unsplit layer's operand
        self.gemms.sr_index = {
            "fprop": (None, SRIndex(row_offset=off)),  # x replicated; W rows
            "dgrad": (SRIndex(col_offset=off, row_stride=full), SRIndex(col_offset=off, row_stride=full)),  # dY, W^T
            "wgrad": (SRIndex(row_offset=off), None),  # dY^T rows; x^T replicated
        }
        self.gemms.splits = self.gemm_splits(self.recipe)

    @property
    def partition_stride(self) -> int:
        """The fused parts S of the output (QuantizedLinear.fused_parts)."""
        return self.fused_parts

    def _part_slices(self):
        s, n = self.partition_stride, self.out_features // self.partition_stride
        per_part_full = self.full_out_features // s
        return [(slice(p * n, (p + 1) * n), p * per_part_full + self.tp_rank * n) for p in range(s)]

    def gemm_splits(self, recipe: Recipe) -> dict:
        """Sub-GEMMs for a strided shard whose stochastically rounded operand spans its parts
        (GEMMs without one run whole: indices do not matter then)."""
        if self.partition_stride == 1 or self.tp == 1:  # the shard is one contiguous block
            return {}
        full, out = self.full_out_features, {}
        for gemm in ("fprop", "dgrad", "wgrad"):
            spec = recipe.gemm(gemm)
            if not spec.quantized:
                continue
            sr_a, sr_b = spec.a.rounding == "sr", spec.b.rounding == "sr"
            if gemm == "fprop" and sr_b:  # B = W rows (out/tp, in): split N, concatenate outputs
                out[gemm] = GemmSplit([GemmPart(b_rows=sl, b_index=SRIndex(row_offset=g))
                                       for sl, g in self._part_slices()], "cat_cols")
            elif gemm == "dgrad" and (sr_a or sr_b):  # A = dY (T, out/tp), B = W^T (in, out/tp): split K, sum
                out[gemm] = GemmSplit([GemmPart(a_cols=sl, a_index=SRIndex(col_offset=g, row_stride=full), b_cols=sl,
                                                b_index=SRIndex(col_offset=g, row_stride=full))
                                       for sl, g in self._part_slices()], "sum")
            elif gemm == "wgrad" and sr_a:  # A = dY^T (out/tp, T): split M, concatenate rows
                out[gemm] = GemmSplit([GemmPart(a_rows=sl, a_index=SRIndex(row_offset=g))
                                       for sl, g in self._part_slices()], "cat_rows")
        return out

    def forward_with(self, x, weight, bias, gemms):
        y = super().forward_with(x, weight, bias, gemms)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tp={self.tp_rank}/{self.tp} of out_features={self.full_out_features}"
                f"{f', stride={self.partition_stride}' if self.partition_stride > 1 else ''}"
                f"{', sequence_parallel' if self.sequence_parallel else ''}")


class RowParallelLinear(_TensorParallelLinear):
    """y = sum_r x_r W_r^T + b with W's input columns split over the TP group.

    The input is the local [.., in/tp] shard (``input_is_parallel=False`` scatters a
    replicated input first).  The FP32 partial outputs are all-reduced (sequence parallel:
    reduce-scattered to [batch, seq/tp, out]); the bias is replicated and added once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe=None, *,
                 state: ParallelState | None = None, layer_index: int | None = None, num_layers: int | None = None,
                 sr_seed: int = 0, backend: str = "emulated", input_is_parallel: bool = True,
                 sequence_parallel: bool | None = None, name: str | None = None, collect_stats: bool = False,
                 step_context=None, device=None, dtype=None):
        recipe = _resolve_recipe(recipe)
        tp, rank, _ = tp_info(state)
        what = f"RowParallelLinear{f' {name!r}' if name else ''} ({in_features} -> {out_features}) at TP={tp}"
        if in_features % tp:
            raise ValueError(f"{what}: in_features={in_features} is not divisible by TP={tp}")
        if not recipe.is_high_precision_layer(layer_index, num_layers):
            need = max(_shard_need(recipe, "fprop"), _weight_2d_block(recipe))
            if (in_features // tp) % need:
                raise ValueError(f"{what}: each rank's shard of {in_features // tp} input columns must be a multiple "
                                 f"of {need} (recipe {recipe.name} quantizes Fprop in blocks/RHT tiles of {need} "
                                 "along in_features)")
        super().__init__(in_features // tp, out_features, bias, recipe, layer_index=layer_index,
                         num_layers=num_layers, sr_seed=sr_seed, backend=backend, collect_stats=collect_stats,
                         step_context=step_context, device=device, dtype=dtype)
        self._setup_tp(state, name, sequence_parallel, RowHooks)
        self.full_in_features, self.full_out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        # the bias is whole on every rank; under sequence parallelism its gradient is a partial sum
        # (attach_placements records that with the other replicated parameters)
        self.placements = {"weight": Placement((out_features, in_features), 1, 1, tp, self.tp_rank)}
        off, full = self.tp_rank * self.in_features, in_features
        self.gemms.sr_index = {
            "fprop": (SRIndex(col_offset=off, row_stride=full), SRIndex(col_offset=off, row_stride=full)),  # x, W
            "dgrad": (None, SRIndex(row_offset=off)),  # dY replicated (gathered); W^T rows
            "wgrad": (None, SRIndex(row_offset=off)),  # dY^T replicated; x^T rows
        }

    def forward_with(self, x, weight, bias, gemms):
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)
        return super().forward_with(x, weight, bias, gemms)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tp={self.tp_rank}/{self.tp} of in_features={self.full_in_features}"
                f"{', sequence_parallel' if self.sequence_parallel else ''}")


__all__ = ["ColumnHooks", "ColumnParallelLinear", "GroupHandle", "RowHooks", "RowParallelLinear", "TPGroupMixin",
           "tp_info"]
