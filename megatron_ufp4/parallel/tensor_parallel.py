"""Megatron-style tensor-parallel layers (+ sequence parallelism) on the FP4 GEMM path.

Column-parallel linear  y_r = x W_r^T       W_r = rows [r*out/tp, (r+1)*out/tp) of W
Row-parallel linear     y   = sum_r x_r W_r^T   W_r = columns [r*in/tp, (r+1)*in/tp), x_r the
                        matching slice of x (the output of a column-parallel layer)

Both subclass ``QuantizedLinear``: the weight parameter *is* the local shard, the recipe and
its per-layer high-precision rule are the same, and every rank quantizes its shard along
the reduction axis of each GEMM exactly as the unsplit layer would:

- shards must be whole quantization blocks / RHT tiles (checked at construction, with a
  one-line error), so a shard's blocks are blocks of the full tensor;
- stochastic rounding draws are a hash of (key, global element index): each sharded
  operand passes its ``SRIndex`` (offset in the full tensor), and every TP rank seeds its
  generator like the single-process module, so the draws equal the unsplit layer's;
- NVFP4's per-tensor amax goes through ``GemmContext.amax_reduce`` = all-reduce(MAX) over
  the TP group, so the second-level scale is the full tensor's;
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

A fused column layer with ``partition_stride`` S (S=2: the SwiGLU [gate; up]) holds, on
rank r, [part_0 shard r; ...; part_{S-1} shard r].  Its shard is not one contiguous block
of the full tensor, so a GEMM whose stochastically rounded operand spans the parts runs
per part, every part drawing the same key (the generator is rewound) at its own offset
and using the whole operand's (global) NVFP4 amax: bitwise the unsplit layer's rounding.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..fp4.recipes import Recipe
from ..fp4.sr_random import SRIndex, sr_position
from ..linear.quantized_linear import GemmContext, QuantizedLinear
from .mappings import (SEQ_DIM, all_gather, all_reduce, gather_from_tp, group_size, reduce_from_tp, reduce_scatter,
                       reduce_scatter_to_sp, scatter_to_tp)
from .state import ParallelState


def _tp_info(state: ParallelState | None):
    if state is None:
        return 1, 0, None
    return state.tp, state.tp_rank, state.group("tp")


class _GroupHandle:
    """A process-group reference that ``copy.deepcopy`` shares instead of copying (process
    groups cannot be copied), so a TP model can still be deep-copied (e.g. for EMA)."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class _AmaxAllReduce(_GroupHandle):
    """GemmContext.amax_reduce: all-reduce(MAX) of an NVFP4 tensor amax over the TP group."""

    def __call__(self, amax: torch.Tensor) -> torch.Tensor:
        return all_reduce(amax, self.group, op=dist.ReduceOp.MAX)


class _TPGroupMixin:
    @property
    def tp_group(self):
        return self._tp_handle.group

    def _set_tp(self, state: ParallelState | None, sequence_parallel: bool | None):
        self.tp, self.tp_rank, group = _tp_info(state)
        self._tp_handle = _GroupHandle(group)
        self.sequence_parallel = bool(state.sequence_parallel if (sequence_parallel is None and state is not None)
                                      else sequence_parallel)


def set_tensor_parallel_attributes(param: nn.Parameter, partition_dim: int, partition_stride: int = 1) -> None:
    param.tensor_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = partition_stride


def _shard_need(recipe: Recipe, gemm: str) -> int:
    """Granularity a shard of ``gemm``'s reduction axis must respect (block and RHT tile)."""
    spec = recipe.gemm(gemm)
    if not spec.quantized:
        return 1
    return max(spec.a.fmt.block, spec.b.fmt.block, recipe.rht_size if spec.rht else 1)


def _weight_2d_block(recipe: Recipe) -> int:
    w = recipe.fprop.b.fmt
    return w.block if (w is not None and w.block_2d) else 1


def _resolve_recipe(recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)


_HALF = (torch.bfloat16, torch.float16)


def _dtypes(layer, x: torch.Tensor, weight: torch.Tensor):
    """(output dtype, high-precision compute dtype or None for the FP4 path) of one call,
    following F.linear (high precision) / QuantizedLinear (FP4) under autocast or not."""
    dev = x.device.type
    auto = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if getattr(layer, "quantized", False):
        return auto or x.dtype, None
    hp = auto or torch.promote_types(x.dtype, weight.dtype)
    return hp, hp


def _hp_gemm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A @ B^T with inputs rounded to ``dtype`` (the high-precision GEMM's input dtype) and
    an FP32 (or wider) result: what a bf16 GEMM accumulates before its final rounding, so
    TP partial sums are reduced before, not after, that rounding."""
    a, b = a.to(dtype), b.to(dtype)
    if dtype not in _HALF:
        return a @ b.t()
    if a.is_cuda:
        try:
            return torch.mm(a, b.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float().t()  # bf16/fp16 products are exact in fp32


def _layer_gemm(layer, gemm: str, a, b, hp_dtype):
    return layer._gemm(gemm, a, b) if hp_dtype is None else _hp_gemm(a, b, hp_dtype)


def _finish(t: torch.Tensor, hp_dtype, dtype) -> torch.Tensor:
    """High precision: round to the GEMM's dtype first (as the single-process F.linear does)."""
    return (t.to(hp_dtype) if hp_dtype is not None else t).to(dtype)


class _TensorParallelLinear(_TPGroupMixin, QuantizedLinear):
    """Shared plumbing: TP coordinates, amax all-reduce, split-GEMM runner."""

    def _setup_tp(self, state, name, sequence_parallel):
        self._set_tp(state, sequence_parallel)
        self.name = name
        if self.tp > 1 and self.tp_group is not None:
            self.ctx.amax_reduce = _AmaxAllReduce(self.tp_group)

    def _amax(self, t: torch.Tensor, gemm: str) -> torch.Tensor:
        """The tensor amax the backend would compute for operand ``t`` of ``gemm``, over TP."""
        spec = self.recipe.gemm(gemm)
        rht = self.ctx.rht if spec.rht else None
        pad = (-t.shape[-1]) % _shard_need(self.recipe, gemm)
        if pad:
            t = F.pad(t, (0, pad))
        src = rht.rotate(t) if rht is not None else t
        amax = src.abs().amax().float()
        return self.ctx.amax_reduce(amax) if self.ctx.amax_reduce is not None else amax

    def _run_parts(self, gemm: str, a: torch.Tensor, b: torch.Tensor, parts, combine):
        """Run ``gemm`` as several sub-GEMMs (a_p, sr_a, b_p, sr_b) that together are A @ B^T.

        Every part starts from the same generator state, so each SR operand part uses the key
        the unsplit GEMM would draw (at its own global offset); NVFP4 tensor amaxes are the
        whole operands'.  The backend calls ``amax_reduce`` for A before B.
        """
        spec = self.recipe.gemm(gemm)
        amaxes = [self._amax(t, gemm) for t, op in ((a, spec.a), (b, spec.b)) if op.fmt.scale == "e4m3"]
        gen = self.ctx.generator
        start = gen.get_state()
        outs = []
        for a_p, sr_a, b_p, sr_b in parts:
            gen.set_state(start)
            fixed = iter(amaxes)
            sub = dataclasses.replace(self.ctx, amax_reduce=lambda _local, it=fixed: next(it),
                                      sr_index={gemm: (sr_a, sr_b)})
            outs.append(sub.run(gemm, a_p, b_p))
        return combine(outs)

    def _gemm(self, gemm: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.ctx.run(gemm, a, b)


# -- column parallel ------------------------------------------------------------------------
def _set_position(layer, position) -> None:
    """Backward may run after later micro-batches' forwards: restore the SR position."""
    if isinstance(getattr(layer, "ctx", None), GemmContext):
        layer.ctx.position = position


class _ColumnParallelFn(torch.autograd.Function):
    """Column-parallel GEMMs (FP4 through the layer's recipe, or high precision when
    ``hp_dtype`` is set) with the TP collectives inside: the Dgrad partial sums are reduced
    in FP32 before any rounding."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, out_dtype, hp_dtype):
        ctx.layer, ctx.has_bias, ctx.hp_dtype = layer, bias is not None, hp_dtype
        ctx.sr_position = sr_position()
        _set_position(layer, ctx.sr_position)
        ctx.save_for_backward(x, weight)  # sequence parallel: the local slice; re-gathered in backward
        x_total = all_gather(x, SEQ_DIM, layer.tp_group) if layer.sequence_parallel else x
        with torch.autocast(x.device.type, enabled=False):
            y = _layer_gemm(layer, "fprop", x_total.reshape(-1, x.shape[-1]), weight, hp_dtype)
            if bias is not None:
                y = y + (bias.to(hp_dtype) if hp_dtype is not None else bias).to(y.dtype)
        return y.to(out_dtype).reshape(*x_total.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        layer, hp = ctx.layer, ctx.hp_dtype
        _set_position(layer, ctx.sr_position)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = _layer_gemm(layer, "dgrad", dy2, weight.t(), hp).reshape(*dy.shape[:-1], weight.shape[1])
                dx = (reduce_scatter(dx, SEQ_DIM, layer.tp_group) if layer.sequence_parallel
                      else all_reduce(dx, layer.tp_group))  # FP32 partial sums
                dx = _finish(dx, hp, x.dtype)
            if ctx.needs_input_grad[1]:
                x_total = all_gather(x, SEQ_DIM, layer.tp_group) if layer.sequence_parallel else x
                dw = _finish(_layer_gemm(layer, "wgrad", dy2.t(), x_total.reshape(-1, x.shape[-1]).t(), hp), hp,
                             weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = _finish(dy2.float().sum(0), hp, weight.dtype)
        return dx, dw, db, None, None, None


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
                 device=None, dtype=None):
        recipe = _resolve_recipe(recipe)
        tp, rank, _ = _tp_info(state)
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
                         device=device, dtype=dtype)
        self._setup_tp(state, name, sequence_parallel)
        self.full_in_features, self.full_out_features = in_features, out_features
        self.partition_stride, self.gather_output = stride, gather_output
        set_tensor_parallel_attributes(self.weight, 0, stride)
        if self.bias is not None:
            set_tensor_parallel_attributes(self.bias, 0, stride)
        off, full = self.tp_rank * self.out_features, out_features
        # where each (2-D) GEMM operand of this shard sits in the unsplit layer's operand
        self.ctx.sr_index = {
            "fprop": (None, SRIndex(row_offset=off)),  # x replicated; W rows
            "dgrad": (SRIndex(col_offset=off, row_stride=full), SRIndex(col_offset=off, row_stride=full)),  # dY, W^T
            "wgrad": (SRIndex(row_offset=off), None),  # dY^T rows; x^T replicated
        }

    # -- strided (fused) shards: GEMMs whose SR operand spans several parts run per part --------
    def _part_slices(self):
        s, n = self.partition_stride, self.out_features // self.partition_stride
        per_part_full = self.full_out_features // s
        return [(slice(p * n, (p + 1) * n), p * per_part_full + self.tp_rank * n) for p in range(s)]

    def _gemm(self, gemm, a, b):
        spec = self.recipe.gemm(gemm)
        if self.partition_stride == 1 or self.tp == 1 or not spec.quantized:  # the shard is one contiguous block
            return self.ctx.run(gemm, a, b)
        sr_a, sr_b = spec.a.rounding == "sr", spec.b.rounding == "sr"
        full = self.full_out_features
        if gemm == "fprop" and sr_b:  # B = W rows (out/tp, in): split N, concatenate outputs
            parts = [(a, None, b[sl], SRIndex(row_offset=g)) for sl, g in self._part_slices()]
            return self._run_parts(gemm, a, b, parts, lambda o: torch.cat(o, dim=1))
        if gemm == "dgrad" and (sr_a or sr_b):  # A = dY (T, out/tp), B = W^T (in, out/tp): split K, sum
            parts = [(a[:, sl], SRIndex(col_offset=g, row_stride=full), b[:, sl], SRIndex(col_offset=g, row_stride=full))
                     for sl, g in self._part_slices()]
            return self._run_parts(gemm, a, b, parts, lambda o: functools.reduce(torch.add, o))
        if gemm == "wgrad" and sr_a:  # A = dY^T (out/tp, T): split M, concatenate rows
            parts = [(a[sl], SRIndex(row_offset=g), b, None) for sl, g in self._part_slices()]
            return self._run_parts(gemm, a, b, parts, lambda o: torch.cat(o, dim=0))
        return self.ctx.run(gemm, a, b)  # no stochastic rounding on the split operand: indices do not matter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype, hp_dtype = _dtypes(self, x, self.weight)
        if self.quantized and self.ctx.generator.device != x.device:
            self._move_generator(x.device)
        y = _ColumnParallelFn.apply(x, self.weight, self.bias, self, out_dtype, hp_dtype)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tp={self.tp_rank}/{self.tp} of out_features={self.full_out_features}"
                f"{f', stride={self.partition_stride}' if self.partition_stride > 1 else ''}"
                f"{', sequence_parallel' if self.sequence_parallel else ''}")


# -- row parallel ---------------------------------------------------------------------------
class _RowParallelFn(torch.autograd.Function):
    """Row-parallel GEMMs with the TP collectives inside: the Fprop partial sums are reduced
    (all-reduce, or reduce-scatter under sequence parallelism) in FP32 before any rounding."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, out_dtype, hp_dtype):
        ctx.layer, ctx.has_bias, ctx.hp_dtype = layer, bias is not None, hp_dtype
        ctx.sr_position = sr_position()
        _set_position(layer, ctx.sr_position)
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            y = _layer_gemm(layer, "fprop", x.reshape(-1, x.shape[-1]), weight, hp_dtype)
            y = y.reshape(*x.shape[:-1], weight.shape[0])
            y = reduce_scatter(y, SEQ_DIM, layer.tp_group) if layer.sequence_parallel else all_reduce(y, layer.tp_group)
            if bias is not None:
                y = y + (bias.to(hp_dtype) if hp_dtype is not None else bias).to(y.dtype)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        layer, hp = ctx.layer, ctx.hp_dtype
        _set_position(layer, ctx.sr_position)
        dy_total = all_gather(dy, SEQ_DIM, layer.tp_group) if layer.sequence_parallel else dy
        dy2 = dy_total.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = _finish(_layer_gemm(layer, "dgrad", dy2, weight.t(), hp), hp, x.dtype).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                dw = _finish(_layer_gemm(layer, "wgrad", dy2.t(), x.reshape(-1, x.shape[-1]).t(), hp), hp,
                             weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:  # local tokens under SP: summed by sync_sequence_parallel_grads
                db = _finish(dy.reshape(-1, dy.shape[-1]).float().sum(0), hp, weight.dtype)
        return dx, dw, db, None, None, None


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
                 device=None, dtype=None):
        recipe = _resolve_recipe(recipe)
        tp, rank, _ = _tp_info(state)
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
                         device=device, dtype=dtype)
        self._setup_tp(state, name, sequence_parallel)
        self.full_in_features, self.full_out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.partition_stride = 1
        set_tensor_parallel_attributes(self.weight, 1, 1)
        if self.bias is not None and self.sequence_parallel:
            self.bias.sequence_parallel = True
        off, full = self.tp_rank * self.in_features, in_features
        self.ctx.sr_index = {
            "fprop": (SRIndex(col_offset=off, row_stride=full), SRIndex(col_offset=off, row_stride=full)),  # x, W
            "dgrad": (None, SRIndex(row_offset=off)),  # dY replicated (gathered); W^T rows
            "wgrad": (None, SRIndex(row_offset=off)),  # dY^T replicated; x^T rows
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)
        out_dtype, hp_dtype = _dtypes(self, x, self.weight)
        if self.quantized and self.ctx.generator.device != x.device:
            self._move_generator(x.device)
        return _RowParallelFn.apply(x, self.weight, self.bias, self, out_dtype, hp_dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tp={self.tp_rank}/{self.tp} of in_features={self.full_in_features}"
                f"{', sequence_parallel' if self.sequence_parallel else ''}")


# -- vocabulary-parallel embedding, output head and cross entropy ---------------------------------
class VocabParallelEmbedding(_TPGroupMixin, nn.Module):
    """nn.Embedding with the vocabulary rows split over TP: rank r holds rows
    [r*V/tp, (r+1)*V/tp) and looks up only its tokens (others give 0); the partial
    embeddings are all-reduced (sequence parallel: reduce-scattered to [b, s/tp, h])."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, state: ParallelState | None = None,
                 sequence_parallel: bool | None = None, device=None, dtype=None):
        super().__init__()
        self._set_tp(state, sequence_parallel)
        if num_embeddings % self.tp:
            raise ValueError(f"VocabParallelEmbedding: vocabulary of {num_embeddings} is not divisible by TP={self.tp}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start = self.tp_rank * (num_embeddings // self.tp)
        self.vocab_end = self.vocab_start + num_embeddings // self.tp
        self.weight = nn.Parameter(torch.empty(num_embeddings // self.tp, embedding_dim, device=device, dtype=dtype))
        set_tensor_parallel_attributes(self.weight, 0, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)  # nn.Embedding's default; models re-init

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sp(out, self.tp_group) if self.sequence_parallel else reduce_from_tp(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}) "
                f"tp={self.tp_rank}/{self.tp}{', sequence_parallel' if self.sequence_parallel else ''}")


class VocabParallelLMHead(_TPGroupMixin, nn.Module):
    """High-precision output head, column-parallel over the vocabulary: returns this
    rank's logits shard [.., V/tp] (feed it to ``vocab_parallel_cross_entropy``).
    Sequence parallel: the input [b, s/tp, h] is all-gathered along the sequence first.
    Its input-gradient partial sums are reduced in FP32 (then rounded like F.linear's)."""

    def __init__(self, in_features: int, out_features: int, *, state: ParallelState | None = None,
                 sequence_parallel: bool | None = None, device=None, dtype=None):
        super().__init__()
        self._set_tp(state, sequence_parallel)
        if out_features % self.tp:
            raise ValueError(f"VocabParallelLMHead: vocabulary of {out_features} is not divisible by TP={self.tp}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // self.tp, in_features, device=device, dtype=dtype))
        set_tensor_parallel_attributes(self.weight, 0, 1)
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default; models re-init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype, hp_dtype = _dtypes(self, x, self.weight)
        return _ColumnParallelFn.apply(x, self.weight, None, self, out_dtype, hp_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, vocab shard {self.weight.shape[0]} of {self.out_features}"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, ignore_index):
        logits = logits.float()
        v_local = logits.shape[-1]
        start = group_rank_of(group) * v_local
        m = all_reduce(logits.detach().amax(dim=-1), group, op=dist.ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        outside = (labels < start) | (labels >= start + v_local)
        local = (labels - start).masked_fill(outside, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        both = all_reduce(torch.stack([picked, exp.sum(dim=-1)]), group)  # one all-reduce for both sums
        picked, sum_exp = both[0], both[1]
        loss = sum_exp.log() - picked
        ignored = labels == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, outside, ignored = ctx.saved_tensors
        grad = softmax.clone()
        onehot = grad.new_zeros(grad.shape).scatter_(-1, local.unsqueeze(-1), (~outside).to(grad.dtype).unsqueeze(-1))
        grad.sub_(onehot).mul_(g.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None


def group_rank_of(group) -> int:
    return 0 if group_size(group) == 1 else dist.get_rank(group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group=None, *,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of vocabulary-sharded logits [.., V/tp] (rank r holds classes
    [r*V/tp, (r+1)*V/tp)) against full labels [..], in FP32 with a max and a sum
    all-reduce over ``group``.  Same semantics as ``F.cross_entropy`` on the gathered
    logits: ``reduction`` "mean" (over labels != ignore_index), "sum" or "none"."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none' (got {reduction!r})")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree before the "
                         "vocabulary dim")
    loss = _VocabParallelCrossEntropy.apply(logits, labels, group, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (labels != ignore_index).sum().clamp_min(1)


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelLMHead",
           "vocab_parallel_cross_entropy", "set_tensor_parallel_attributes"]
