"""Autograd-aware collectives for tensor and sequence parallelism (Megatron's "mappings").

Every function takes the tensor-parallel process group (``state.group("tp")``); with
``group=None`` (single process) or a group of one rank each is the identity.

    tensor parallel (last dim = hidden / vocab shards)
        copy_to_tp          fwd identity            bwd all-reduce(sum)
        reduce_from_tp      fwd all-reduce(sum)     bwd identity
        gather_from_tp      fwd all-gather(last)    bwd keep local slice
        scatter_to_tp       fwd keep local slice    bwd all-gather(last)
    sequence parallel (dim 1 of [batch, seq, hidden])
        gather_from_sp      fwd all-gather(seq)     bwd reduce-scatter(seq) (or keep local slice)
        reduce_scatter_to_sp fwd reduce-scatter(seq) bwd all-gather(seq)
        scatter_to_sp       fwd keep local slice    bwd all-gather(seq)

Reductions run in the dtype they are given: callers that reduce partial GEMM outputs cast
them to float32 first (see tensor_parallel.py).  The raw (non-autograd) helpers
``all_reduce``, ``all_gather``, ``reduce_scatter`` are used inside custom autograd functions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# -- raw collectives (no autograd) ------------------------------------------------------------
def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, op=op, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _check_divisible(size: int, n: int, dim: int, what: str) -> None:
    if size % n:
        raise ValueError(f"{what}: dimension {dim} has size {size}, not divisible by the {n} tensor-parallel ranks")


def split_local(x: torch.Tensor, dim: int, group, what: str = "scatter") -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    _check_divisible(x.shape[dim], n, dim, what)
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group, then keep this rank's 1/n slice along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    _check_divisible(x.shape[dim], n, dim, "reduce_scatter")
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=group)
    return out


# -- autograd functions ---------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return split_local(g, -1, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_local(x, -1, group, "scatter_to_tp")

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, -1, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group, ctx.tp_grad = group, tensor_parallel_output_grad
        return all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.tp_grad:  # each rank holds a partial gradient of the full sequence: sum, keep own slice
            return reduce_scatter(g, SEQ_DIM, ctx.group), None, None
        return split_local(g, SEQ_DIM, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, SEQ_DIM, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_local(x, SEQ_DIM, group, "scatter_to_sp")

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, SEQ_DIM, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradient all-reduced backward."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results (identity backward)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' last-dim shards (backward keeps this rank's slice)."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's last-dim slice of a replicated tensor (backward all-gathers)."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """[b, s/tp, h] -> [b, s, h].  Backward reduce-scatters when the consumer is tensor-parallel
    (each rank's gradient is a partial sum), else just keeps the local slice."""
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s/tp, h] of the total (backward all-gathers)."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] replicated -> this rank's [b, s/tp, h] (backward all-gathers)."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


__all__ = ["copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp", "gather_from_sp",
           "reduce_scatter_to_sp", "scatter_to_sp", "all_reduce", "all_gather", "reduce_scatter", "split_local",
           "group_size", "group_rank", "SEQ_DIM"]
