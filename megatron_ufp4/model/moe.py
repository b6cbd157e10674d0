"""Mixture-of-experts layer: router, token dispatch / combine, load balancing.

Router (high precision): scores = softmax or sigmoid of x W_r^T; the top-k experts are
picked on scores + expert_bias (the bias steers *selection only*), and the k weights are
the plain scores, optionally renormalised to sum to 1, times ``routed_scaling_factor``.
Group-limited routing (DeepSeek-V3): the experts form ``groups`` equal contiguous groups,
each scored by the sum of its two best biased scores; a token chooses its k experts inside
its ``topk_groups`` best groups only (with EP, groups aligned to ranks bound how many ranks
a token is sent to).

Dispatch has no loop over tokens: token-slots are sorted by expert id, the sorted rows run
through the experts as grouped GEMMs (``GroupedExperts``, experts.py: bitwise the loop over
experts, which skips experts without tokens), and the weighted outputs are scattered back
with one ``index_add_``.  The dispatch is pluggable:
``MoE.dispatcher`` (default ``LocalDispatcher()``, every expert on this rank) is any object
with ``__call__(moe, x, weights, idx) -> combined output`` and ``global_load(load) -> load``;
expert parallelism (parallel/expert.py) swaps in all-to-all / all-gather dispatchers that
send token slices to the ranks holding their experts.

Load balancing, two mechanisms (either, both, or neither):
- Switch/GShard auxiliary loss  coeff * E * sum_i f_i * P_i  (f_i: fraction of the N*k
  token-slots routed to expert i; P_i: mean router probability of expert i, for sigmoid
  scores the per-token normalised scores).  In training, f_i comes from the loads
  ``dispatcher.global_load`` returns (summed over the data-parallel ranks when the batch is
  split over them) while P_i stays this rank's mean, so the data-parallel average of the
  gradients equals the gradient of the loss on the whole (concatenated) batch.  It is
  attached to the layer output with ``AuxLossScaler`` so that backward adds
  d(aux)/d(params) while the forward returns only hidden states (Megatron's
  MoEAuxLossAutoScaler).
- Aux-loss-free bias (DeepSeek-V3): ``update_expert_bias()`` moves
  b_i += rate * sign(mean_load - load_i) using the loads accumulated (in training mode)
  since the previous update.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..linear import StepContext
from .config import ModelConfig
from .experts import GroupedExperts
from .init import KeyedInit
from .layers import SwiGLU


class AuxLossScaler(torch.autograd.Function):
    """Identity on ``output``; in backward the ``aux_loss`` receives gradient ``scale``.

    ``scale`` is the model's ``StepContext.aux_loss_scale`` when the forward runs: a
    training loop that divides the LM loss by the number of micro-batches (or multiplies
    it by a loss scale) sets the same factor so both losses reach the gradient with the
    same weight (Megatron's MoEAuxLossAutoScaler, without its process-wide scale).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = float(scale)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class Router(nn.Module):
    """Top-k router; computes in at least float32 with autocast off."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, score: str = "softmax",
                 norm_topk: bool = True, groups: int = 1, topk_groups: int = 1, scaling: float = 1.0, device=None):
        super().__init__()
        self.num_experts, self.top_k, self.score, self.norm_topk = num_experts, top_k, score, norm_topk
        self.groups, self.topk_groups, self.scaling = groups, topk_groups, scaling
        self.linear = nn.Linear(hidden_size, num_experts, bias=False, device=device)
        # selection-only bias of aux-loss-free balancing: a buffer (never trained), saved in checkpoints
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor):
        """x (N, hidden) -> weights (N, k), expert ids (N, k), scores (N, E)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.linear.weight.to(dtype))
        scores = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores.detach() + self.expert_bias.to(dtype)
        if self.groups > 1 and self.topk_groups < self.groups:
            choice = self.limit_to_groups(choice)
        _, idx = torch.topk(choice, self.top_k, dim=-1)
        weights = scores.gather(-1, idx)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return weights, idx, scores

    def limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """``choice`` (N, E) with every expert outside the token's ``topk_groups`` best groups
        set to -inf (a group's score: the sum of its two best entries)."""
        n = choice.shape[0]
        grouped = choice.view(n, self.groups, -1)
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = group_score.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, -1)

    def extra_repr(self) -> str:
        groups = f", groups={self.topk_groups}/{self.groups}" if self.groups > 1 else ""
        scaling = f", scaling={self.scaling}" if self.scaling != 1.0 else ""
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score}, "
                f"norm_topk={self.norm_topk}{groups}{scaling}")


def combine(x: torch.Tensor, ys: torch.Tensor, token: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted expert outputs back onto their tokens: out[token[s]] += w[s] * ys[s]."""
    ys = ys * w.unsqueeze(-1)
    return torch.zeros(x.shape, dtype=ys.dtype, device=x.device).index_add_(0, token, ys)


class LocalDispatcher:
    """Every routed expert lives on this rank: gather each expert's slots, run, combine.

    ``load_reduce`` (optional): sums per-expert loads over the ranks that split the batch
    (data parallelism without expert parallelism); ``global_load`` applies it.
    """

    def __init__(self, load_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.load_reduce = load_reduce

    def global_load(self, load: torch.Tensor) -> torch.Tensor:
        return load if self.load_reduce is None else self.load_reduce(load)

    def __call__(self, moe: "MoE", x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        order, counts = moe.sort_slots(weights, idx)
        token = order // idx.shape[1]  # token-slot s belongs to token s // k
        ys = moe.run_experts(x[token], counts)
        if ys is None:  # every slot dropped (or no tokens): only the residual / shared path remains
            return x.new_zeros(x.shape, dtype=torch.promote_types(x.dtype, weights.dtype))
        return combine(x, ys, token, weights.reshape(-1)[order])

    def __repr__(self) -> str:
        return f"LocalDispatcher(load_reduce={self.load_reduce!r})"


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts) replacing the dense MLP of a block.

    After each forward: ``last_load`` (tokens routed to each expert, before any capacity
    dropping), ``last_dropped`` (token-slots dropped by the capacity limit) and
    ``last_aux_loss`` (detached) are kept on the module for logging.
    """

    def __init__(self, config: ModelConfig, linear_factory, layer_index: int, step_context: StepContext | None = None,
                 device=None):
        super().__init__()
        self.step_context = step_context if step_context is not None else StepContext()
        h, f = config.hidden_size, config.expert_ffn_hidden_size
        self.layer_index = layer_index
        self.num_experts, self.top_k = config.num_experts, config.moe_top_k
        self.aux_loss_coeff, self.expert_bias_rate = config.aux_loss_coeff, config.expert_bias_rate
        self.capacity_factor = config.moe_capacity_factor
        self.router = Router(h, config.num_experts, config.moe_top_k, score=config.router_score,
                             norm_topk=config.router_norm_topk, groups=config.router_groups,
                             topk_groups=config.router_topk_groups, scaling=config.routed_scaling_factor,
                             device=device)
        self.experts = GroupedExperts(h, f, linear_factory, layer_index, config.num_experts,
                                      linear_factory.local_experts(config.num_experts), bias=config.bias)
        # the shared experts run on every token; n of them equal one SwiGLU of width n * f
        self.shared = (SwiGLU(h, config.num_shared_experts * f, linear_factory, layer_index, name="mlp.shared",
                              bias=config.bias, in_moe=True) if config.num_shared_experts else None)
        self.register_buffer("load_accum", torch.zeros(config.num_experts, dtype=torch.long, device=device),
                             persistent=False)
        self.last_load: torch.Tensor | None = None
        self.last_dropped: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.dispatcher = LocalDispatcher()  # a plain attribute: not a submodule, nothing in the state dict
        self._reduced_loads: dict = {}  # (step, micro-batch) -> the aux loss's reduced load (balance_load)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        weights, idx, scores = self.router(x2)
        load = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
        if self.training and not self.step_context.recomputing:  # a recomputed forward counts nothing twice
            self.load_accum += load
        aux = self.aux_loss(scores, self.balance_load(load))
        if not self.step_context.recomputing:  # what the logs read: the first forward's
            self.last_load, self.last_aux_loss = load.detach(), aux.detach()
        out = self.dispatcher(self, x2, weights, idx)
        if self.shared is not None:
            out = out + self.shared(x2)
        out = out.to(x.dtype).view(x.shape)
        if self.aux_loss_coeff > 0 and aux.requires_grad and out.requires_grad:
            out = AuxLossScaler.apply(out, aux, self.step_context.aux_loss_scale)
        return out

    def balance_load(self, load: torch.Tensor) -> torch.Tensor:
        """The loads the aux loss balances: this rank's, or in training with the aux loss on,
        the dispatcher's ``global_load`` (a collective over the ranks that split the batch).  A
        recomputed forward reuses its first run's (kept per step and micro-batch), so it adds no
        collective to the backward, where the gradient all-reduce may run on the same ranks."""
        if not (self.training and self.aux_loss_coeff > 0):
            return load
        ctx = self.step_context
        key = (ctx.step, ctx.micro_batch)
        if ctx.recomputing and key in self._reduced_loads:
            return self._reduced_loads[key]
        reduced = self.dispatcher.global_load(load)
        if ctx.step is not None:
            if any(k[0] != ctx.step for k in self._reduced_loads):  # a new step: the old ones are done
                self._reduced_loads.clear()
            self._reduced_loads[key] = reduced.detach()
        return reduced

    def aux_loss(self, scores: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """coeff * E * sum_i f_i * P_i for one forward (0 when the coefficient is 0).
        ``load``: token-slots per expert, local or summed over ranks; f = load / load.sum()."""
        n = scores.shape[0]
        if self.aux_loss_coeff == 0 or n == 0:
            return scores.sum() * 0.0
        probs = scores if self.router.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        frac = load.to(probs.dtype) / load.sum().clamp_min(1).to(probs.dtype)
        return self.aux_loss_coeff * self.num_experts * (frac * probs.mean(dim=0)).sum()

    def capacity(self, num_tokens: int) -> int | None:
        """Most token-slots one expert takes: ceil(factor * N * k / E), or None (no dropping)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def sort_slots(self, weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-slots (s = token * k + j) ordered by expert id, stable, after capacity
        dropping; returns (order, counts per expert).  Sets ``last_dropped``."""
        n, k = idx.shape
        expert, w = idx.reshape(-1), weights.reshape(-1)
        counts = torch.bincount(expert, minlength=self.num_experts)
        cap = self.capacity(n)
        if cap is None:
            order = torch.argsort(expert, stable=True)
            dropped = counts.new_zeros(())
        else:  # keep, per expert, the `cap` slots with the largest router weight (Megatron's "probs" policy)
            order = torch.argsort(w.detach(), descending=True, stable=True)
            order = order[torch.argsort(expert[order], stable=True)]
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=idx.device) - starts[expert[order]]
            order = order[rank < cap]
            kept = counts.clamp(max=cap)
            dropped, counts = (counts - kept).sum(), kept
        if not self.step_context.recomputing:
            self.last_dropped = dropped
        return order, counts

    def run_experts(self, xs: torch.Tensor, counts) -> torch.Tensor | None:
        """Rows of ``xs`` grouped by expert (``counts[j]`` rows for the j-th expert this layer
        holds, in global index order) through their experts as grouped GEMMs; returns the
        outputs in the same order, or None when there are no rows."""
        return self.experts(xs, counts)

    # -- balancing and init -----------------------------------------------------------------
    @torch.no_grad()
    def update_expert_bias(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Aux-loss-free step: b_i += rate * sign(mean_load - load_i) with the loads
        accumulated since the last call (``reduce``, e.g. a data-parallel all-reduce, sums
        them over ranks first).  Resets the accumulator; returns the loads used."""
        load = self.load_accum.clone()
        self.load_accum.zero_()
        if reduce is not None:
            load = reduce(load)
        if self.expert_bias_rate > 0:  # no move when nothing was routed, decided on the device (no host sync)
            lf = load.to(self.router.expert_bias.dtype)
            move = self.expert_bias_rate * torch.sign(lf.mean() - lf)
            self.router.expert_bias += torch.where(load.sum() > 0, move, torch.zeros_like(move))
        return load

    @torch.no_grad()
    def init_weights(self, init: KeyedInit, std: float, out_std: float) -> None:
        init.normal_(self.router.linear, "weight", std)
        self.router.expert_bias.zero_()
        self.load_accum.zero_()
        self.experts.init_weights(init, std, out_std)
        if self.shared is not None:
            self.shared.init_weights(init, std, out_std)

    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return self.experts.expert_params()


__all__ = ["AuxLossScaler", "LocalDispatcher", "MoE", "Router", "combine"]
