"""Expert parallelism: routed experts sharded over the EP group, tokens sent to their experts.

Layout (see state.py): EP is carved out of data parallelism, ``ep_rank = dp_rank % EP``.
EP rank r holds the routed experts ``[r * E / EP, (r + 1) * E / EP)`` of every MoE layer;
everything else (attention, norms, router, shared experts) is replicated.  A rank's model
is built with its experts only (``ParallelLinearFactory.local_experts``), stacked, each
keeping its *global* index: checkpoint keys are ``layers.{i}.mlp.experts.{e}.gate_up.weight``
with the global ``e`` on whichever rank holds expert ``e``, so model and optimizer
checkpoints do not depend on the layout.

Token dispatchers (plugged into ``MoE.dispatcher``; the model code has no EP branch):

* ``AllToAllDispatcher`` (Megatron's "alltoall"): each rank sorts its token-slots by
  expert (``MoE.sort_slots``; capacity dropping, if any, is applied per rank to the local
  tokens before dispatch, as in Megatron), exchanges the per-expert counts with one
  ``all_to_all_single``, then the token rows with a second one (autograd: backward is the
  reverse all-to-all).  The receiver regroups the rows expert-major (source rank minor),
  runs its experts, undoes the regrouping and sends the outputs back the same way; the
  router weights are applied and the slots summed into their tokens on the source rank
  (``combine``, the same arithmetic as the single-process ``LocalDispatcher``).
* ``AllGatherDispatcher`` (Megatron's "allgather"): all-gather the tokens, router weights
  and kept expert ids over the EP group, every rank computes the slots of its own experts
  for the whole gathered batch, and a reduce-scatter (an all-reduce and a slice here: gloo
  has no reduce-scatter) returns each rank the summed outputs of its tokens.  Simpler,
  more traffic; the reference for the all-to-all.

Rows reach an expert in the order (source rank, position in that rank's sorted slots), the
order the single-process model sees for the concatenated batch, so expert GEMMs get the
same rows in the same order.

Both dispatchers work when a rank sends or receives no rows or an expert gets none: the
received (possibly empty) tensor stays in the autograd graph, so every rank runs every
backward collective.  Experts that got no rows get no gradient (``grad is None``);
``DataParallel`` treats that as zero.

Load-balancing statistics.  ``dispatcher.global_load(load)`` all-reduces (sums) the
per-expert token-slot counts over the ``load_group`` -- by default the data-parallel
group, which contains the EP group: all ranks that split one global batch inside a
pipeline stage.  The aux loss on each rank is then ``coeff * E * sum_i f_i^global *
P_i^local`` (see moe.py): Megatron-Core's *global-batch* load-balancing loss
(``moe_router_load_balancing_type="global_aux_loss"``, tokens_per_expert reduced over
the tp x dp x cp group; our tensor-parallel ranks see the same tokens, so the tp factor
drops out), without Megatron's running average over micro-batches.  With equal micro-batch
sizes the dp-average of these per-rank losses is the single-process aux loss of the
concatenated batch, and the dp-averaged gradients are its gradients.  Megatron's default
``"aux_loss"`` reduces over tp x cp only (per-rank micro-batch balance); pass
``load_group=None`` to get that (local) behaviour.

Aux-loss-free expert bias: ``update_expert_bias(model, group)`` all-reduces the loads
accumulated since the last update (all MoE layers in one collective) over the
data-parallel group before the sign update, so every rank keeps identical biases.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..linear import linear_output_dtype
from ..model.moe import LocalDispatcher, MoE, combine
from .mappings import group_rank, group_size
from .state import expert_range

__all__ = ["AllGatherDispatcher", "AllToAllDispatcher", "all_to_all", "build_expert_parallel_model",
           "expert_range", "load_all_reduce", "make_dispatcher", "moe_layers", "reduced_moe_stats",
           "set_dispatcher", "shard_experts", "update_expert_bias"]


# -- small collective helpers ------------------------------------------------------------------
def load_all_reduce(group) -> Callable[[torch.Tensor], torch.Tensor]:
    """``load -> sum of load over group`` (a copy; identity for a single-process group)."""
    def reduce(load: torch.Tensor) -> torch.Tensor:
        out = load.clone()
        if group_size(group) > 1:
            dist.all_reduce(out, group=group)
        return out
    return reduce


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split ``input_splits`` to the group's ranks; receive ``output_splits``."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        gx = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` over dim 0 (identity for a single-process group)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def _gather_padded(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """All-gather rows of unequal counts (padded to the largest); rank-major concatenation."""
    pad = max(sizes)
    buf = t.new_zeros((pad, *t.shape[1:]))
    buf[:t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather several row-aligned tensors in one autograd node (so every rank runs the
    backward collectives in the same order); backward: sum over ranks, keep own rows."""

    @staticmethod
    def forward(ctx, sizes, group, *tensors):
        ctx.sizes, ctx.group = sizes, group
        return tuple(_gather_padded(t, sizes, group) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        rank = group_rank(ctx.group)
        lo = sum(ctx.sizes[:rank])
        out = []
        for g in grads:
            g = g.contiguous().clone()
            dist.all_reduce(g, group=ctx.group)
            out.append(g[lo:lo + ctx.sizes[rank]])
        return (None, None, *out)


class _ReduceScatterRows(torch.autograd.Function):
    """Sum a (sum(sizes), ...) tensor over ranks and keep this rank's rows; backward gathers."""

    @staticmethod
    def forward(ctx, t, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        rank = group_rank(group)
        t = t.contiguous().clone()
        dist.all_reduce(t, group=group)
        lo = sum(sizes[:rank])
        return t[lo:lo + sizes[rank]]

    @staticmethod
    def backward(ctx, grad):
        return _gather_padded(grad.contiguous(), ctx.sizes, ctx.group), None, None


# -- dispatchers --------------------------------------------------------------------------------
class _EPDispatcher:
    def __init__(self, ep_group, load_group=None):
        self.ep_group, self.load_group = ep_group, load_group
        self.ep_size, self.ep_rank = group_size(ep_group), group_rank(ep_group)
        self._reduce = load_all_reduce(load_group)

    def global_load(self, load: torch.Tensor) -> torch.Tensor:
        return self._reduce(load)

    def local_experts(self, moe: MoE) -> tuple[int, int]:
        n = moe.num_experts // self.ep_size
        return self.ep_rank * n, n

    def __deepcopy__(self, memo):  # process groups are shared handles, not copyable state
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ep_size={self.ep_size}, ep_rank={self.ep_rank})"


class AllToAllDispatcher(_EPDispatcher):
    """Token dispatch by all-to-all: per-expert counts, then the rows out and the outputs back; see module doc."""

    def __call__(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        _, n_local = self.local_experts(moe)
        ep, k = self.ep_size, idx.shape[1]
        order, counts = moe.sort_slots(weights, idx)  # slots sorted by global expert = by destination rank
        token = order // k
        xs = x[token]
        # counts[src, j]: slots rank src sends to local expert j of this rank
        recv = torch.empty_like(counts)
        if ep > 1:
            dist.all_to_all_single(recv, counts.contiguous(), group=self.ep_group)
        else:
            recv.copy_(counts)
        recv = recv.view(ep, n_local)
        # a necessary host sync: all_to_all_single takes its split sizes as Python ints
        send_splits = counts.view(ep, n_local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        xr = all_to_all(xs, recv_splits, send_splits, self.ep_group)  # (src, local expert)-major rows
        perm = _chunk_transpose(recv)  # -> (local expert, src)-major: each expert's rows contiguous
        xe = xr[perm]
        ye = moe.run_experts(xe, recv.sum(0))
        # no rows here: keep the (empty) received tensor in the graph so backward's all-to-alls run
        ye = (ye if ye is not None else xe).to(linear_output_dtype(x))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        ys = all_to_all(ye[inv], send_splits, recv_splits, self.ep_group)  # back in `order`
        return combine(x, ys, token, weights.reshape(-1)[order])


def _chunk_transpose(recv: torch.Tensor) -> torch.Tensor:
    """Row permutation turning chunks laid out (src, expert) into (expert, src) order."""
    sizes = recv.reshape(-1)
    starts = (torch.cumsum(sizes, 0) - sizes).view_as(recv)
    sizes_t, starts_t = recv.t().reshape(-1), starts.t().reshape(-1)
    total = int(sizes.sum())
    chunk_start = torch.repeat_interleave(starts_t, sizes_t)
    offset = torch.arange(total, device=recv.device) - torch.repeat_interleave(torch.cumsum(sizes_t, 0) - sizes_t,
                                                                               sizes_t)
    return chunk_start + offset


class AllGatherDispatcher(_EPDispatcher):
    """Token dispatch by all-gather + reduce-scatter over the EP group; see module doc."""

    def __call__(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        first, n_local = self.local_experts(moe)
        n, k = idx.shape
        e_all = moe.num_experts
        order, _ = moe.sort_slots(weights, idx)  # capacity dropping on this rank's tokens
        # per slot: its expert (E for a dropped slot, which no rank holds) and its position in
        # `order`, so each expert takes its rows in the all-to-all order: (source rank, position)
        meta = torch.stack([torch.full((n * k,), e_all, dtype=torch.long, device=idx.device),
                            torch.zeros(n * k, dtype=torch.long, device=idx.device)], -1)
        meta[order, 0] = idx.reshape(-1)[order].long()
        meta[order, 1] = torch.arange(order.numel(), device=idx.device)
        if self.ep_size == 1:
            sizes = [n]
            xg, wg, mg = x, weights, meta
        else:
            sizes_t = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.ep_size)]
            dist.all_gather(sizes_t, torch.tensor([n], dtype=torch.long, device=x.device), group=self.ep_group)
            sizes = [int(s) for s in sizes_t]
            xg, wg = _GatherRows.apply(sizes, self.ep_group, x, weights)
            mg = _gather_padded(meta.view(n, k, 2), sizes, self.ep_group).view(-1, 2)
        ef = mg[:, 0]
        slots = torch.tensor(sizes, device=x.device) * k
        start = torch.repeat_interleave(torch.cumsum(slots, 0) - slots, slots)  # first slot of each slot's rank
        mine = torch.nonzero((ef >= first) & (ef < first + n_local)).flatten()
        key = ef[mine] * ef.numel() + start[mine] + mg[mine, 1]
        order_g = mine[torch.argsort(key)]
        token_g = order_g // k
        xe = xg[token_g]
        ye = moe.run_experts(xe, torch.bincount(ef[order_g] - first, minlength=n_local))
        ye = (ye if ye is not None else xe).to(linear_output_dtype(x))
        partial = combine(xg, ye, token_g, wg.reshape(-1)[order_g])  # this rank's experts, all tokens
        if self.ep_size == 1:
            return partial
        return _ReduceScatterRows.apply(partial, sizes, self.ep_group)


def make_dispatcher(kind: str, ep_group, load_group=None):
    """``kind``: "alltoall" | "allgather" | "local" (no EP; loads still summed over load_group)."""
    if kind == "alltoall":
        return AllToAllDispatcher(ep_group, load_group)
    if kind == "allgather":
        return AllGatherDispatcher(ep_group, load_group)
    if kind == "local":
        return LocalDispatcher(load_all_reduce(load_group) if group_size(load_group) > 1 else None)
    raise ValueError(f"expert dispatcher must be 'alltoall', 'allgather' or 'local' (got {kind!r})")


# -- sharding the model ---------------------------------------------------------------------------
def moe_layers(model) -> list[MoE]:
    """The MoE layers of a model or of a list of pipeline chunks."""
    mods = list(model) if isinstance(model, (list, tuple)) else [model]
    return [m for mod in mods for m in mod.modules() if isinstance(m, MoE)]


def shard_experts(model, ep_size: int, ep_rank: int):
    """Keep only EP rank ``ep_rank``'s routed experts in every MoE layer (in place; returns
    model).  A layer built with them only (the rank's factory) is left as it is."""
    for moe in moe_layers(model):
        mine = list(expert_range(moe.num_experts, ep_size, ep_rank))
        held = list(moe.experts.indices)
        if held == mine:
            continue
        if held != list(range(moe.num_experts)):
            raise ValueError(f"MoE layer {moe.layer_index} holds experts {held[0]}..{held[-1]}, not all "
                             f"{moe.num_experts} nor EP rank {ep_rank}'s")
        moe.experts.select(mine)  # the full layer's stacks are freed: the selection is a copy
    return model


def set_dispatcher(model, dispatcher):
    for moe in moe_layers(model):
        moe.dispatcher = dispatcher
    return model


def build_expert_parallel_model(model, pstate, dispatcher: str = "alltoall", load_group: str | None = "dp"):
    """Turn a full (every expert) model -- or a list of pipeline chunks -- into this rank's
    expert-parallel model, in place; returns it.

    With ``pstate.ep > 1``: drops the experts other EP ranks hold (``shard_experts``) and
    installs an ``AllToAllDispatcher`` / ``AllGatherDispatcher`` over the "ep" group.  With
    ``ep == 1`` the experts stay and a ``LocalDispatcher`` is installed.  In both cases the
    aux loss balances loads summed over ``pstate.group(load_group)`` ("dp" by default; None:
    per-rank loads).  Build the full model identically on every rank (same seed) first, or
    load a checkpoint afterwards: expert parameter names are global.
    """
    lg = pstate.group(load_group) if load_group else None
    if pstate.ep > 1:
        shard_experts(model, pstate.ep, pstate.ep_rank)
        return set_dispatcher(model, make_dispatcher(dispatcher, pstate.group("ep"), lg))
    return set_dispatcher(model, make_dispatcher("local", None, lg))


# -- balancing statistics -----------------------------------------------------------------------------
@torch.no_grad()
def update_expert_bias(model, group=None) -> dict[int, torch.Tensor]:
    """Aux-loss-free bias step on every MoE layer with loads summed over ``group`` (one
    all-reduce for all layers): identical loads, hence identical biases, on every rank.
    Pass the data-parallel group (``pstate.group("dp")``).  Returns {layer: loads} (device
    tensors, no host sync)."""
    moes = moe_layers(model)
    if not moes:
        return {}
    loads = load_all_reduce(group)(torch.stack([m.load_accum for m in moes]))
    return {m.layer_index: m.update_expert_bias(reduce=lambda _local, row=loads[i]: row.clone())
            for i, m in enumerate(moes)}


@torch.no_grad()
def reduced_moe_stats(model, group=None) -> dict[int, dict]:
    """``GPTModel.moe_stats`` over ``group``: loads and dropped slots summed, aux loss
    averaged (one collective).  Call at logging time on every rank of the group."""
    moes = [m for m in moe_layers(model) if m.last_load is not None]
    if not moes:
        return {}
    rows = torch.stack([torch.cat([m.last_load.double(), m.last_dropped.double().view(1),
                                   m.last_aux_loss.double().view(1)]) for m in moes])
    rows = load_all_reduce(group)(rows)
    n = group_size(group)
    return {m.layer_index: {"load": [int(v) for v in r[:-2].tolist()], "dropped": int(r[-2]),
                            "aux_loss": float(r[-1]) / n} for m, r in zip(moes, rows)}
