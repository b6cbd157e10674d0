"""Vocabulary-parallel embedding, output head and cross entropy (Megatron's layout).

Rank r of the TP group holds vocabulary rows [r*V/tp, (r+1)*V/tp) of the embedding and of
the output head; the head returns this rank's logits shard and the cross entropy works on
the shards with one max and one sum all-reduce, never gathering the full logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..linear.linear_fn import LinearPlan, linear, linear_dtypes
from ..model.losses import DEFAULT_CE_CHUNK_TOKENS, VocabShard, chunked_cross_entropy
from ..model.placement import Placement
from .mappings import all_reduce, group_rank, reduce_from_tp, reduce_scatter_to_sp
from .state import ParallelState
from .tensor_parallel import ColumnHooks, TPGroupMixin


class VocabParallelEmbedding(TPGroupMixin, nn.Module):
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
        self.placements = {"weight": Placement((num_embeddings, embedding_dim), 0, 1, self.tp, self.tp_rank)}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)  # nn.Embedding's default; models re-init

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.tp_group)
        return reduce_from_tp(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}) "
                f"tp={self.tp_rank}/{self.tp}{', sequence_parallel' if self.sequence_parallel else ''}")


class VocabParallelLMHead(TPGroupMixin, nn.Module):
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
        self.placements = {"weight": Placement((out_features, in_features), 0, 1, self.tp, self.tp_rank)}
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default; models re-init
        self.hooks = ColumnHooks(self.tp_group, self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype, hp_dtype = linear_dtypes(x, self.weight, quantized=False)
        return linear(x, self.weight, None, LinearPlan(None, self.hooks, out_dtype, hp_dtype, None))

    def chunked_loss(self, x: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CE_CHUNK_TOKENS,
                     **kwargs) -> torch.Tensor:
        """``vocab_parallel_cross_entropy(self(x), labels, tp_group)`` without the logits shard
        [tokens, V/tp]: ``vocab_parallel_chunked_cross_entropy`` (``GPTModel.head_loss`` calls it)."""
        return vocab_parallel_chunked_cross_entropy(x, self.weight, labels, self.tp_group,
                                                    sequence_parallel=self.sequence_parallel,
                                                    chunk_tokens=chunk_tokens, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, vocab shard {self.weight.shape[0]} of {self.out_features}"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, ignore_index):
        logits = logits.float()
        v_local = logits.shape[-1]
        start = group_rank(group) * v_local
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


class _TPVocabShard(VocabShard):
    """The vocabulary rows [start, start + V/tp) of a TP rank: logits combined with MAX / SUM
    all-reduces over the TP group, the input gathered / its FP32 gradient reduced like a
    column-parallel linear's (``ColumnHooks``)."""

    def __init__(self, group, sequence_parallel: bool, start: int):
        self.group, self.start = group, start
        self.hooks = ColumnHooks(group, sequence_parallel)

    def gather_input(self, x):
        return self.hooks.gather_input(x)

    def reduce_input_grad(self, dx):
        return self.hooks.reduce_input_grad(dx)

    def all_max(self, x):
        return all_reduce(x, self.group, op=dist.ReduceOp.MAX)

    def all_sum(self, x):
        return all_reduce(x, self.group)


def vocab_parallel_chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                         group=None, *, sequence_parallel: bool = False,
                                         chunk_tokens: int = DEFAULT_CE_CHUNK_TOKENS, ignore_index: int = -100,
                                         reduction: str = "mean") -> torch.Tensor:
    """``vocab_parallel_cross_entropy(VocabParallelLMHead(hidden), labels, group)`` computed
    ``chunk_tokens`` tokens at a time from the head's input ``hidden`` [B, T, H] ([B, T/tp, H]
    with ``sequence_parallel``; labels are always the full [B, T]) and this rank's weight
    shard [V/tp, H]: the logits shard [tokens, V/tp] never exists at once.  Per chunk one MAX
    and one stacked SUM all-reduce (as the unchunked one, per chunk); backward recomputes
    the chunk's logits locally and reduces the FP32 input gradient once (all-reduce, or
    reduce-scatter under sequence parallelism), as the column-parallel head does."""
    shard = _TPVocabShard(group, sequence_parallel, group_rank(group) * weight.shape[0])
    return chunked_cross_entropy(hidden, weight, labels, shard=shard, chunk_tokens=chunk_tokens,
                                 ignore_index=ignore_index, reduction=reduction)


__all__ = ["VocabParallelEmbedding", "VocabParallelLMHead", "vocab_parallel_cross_entropy",
           "vocab_parallel_chunked_cross_entropy"]
