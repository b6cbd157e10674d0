"""ZeRO-1 distributed AdamW and the global gradient norm of a parallel model.

    opt = DistributedOptimizer(model, pstate, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ... backward, DataParallel.finish_grad_sync() ...
    norm = opt.clip_grad_norm(max_norm)     # same value on every rank
    opt.step()                              # AdamW on owned params, then every rank gets them back
    opt.zero_grad()

Gradients are all-reduced in full by ``DataParallel`` (ZeRO stage 1: only the optimizer
state is sharded).  Each parameter is *owned* by one rank of its replica group -- dense
parameters by one rank of the data-parallel group "dp", routed-expert parameters by one
rank of the expert-data-parallel group "edp" (they are already sharded over EP) -- and
only the owner keeps its AdamW state (exp_avg, exp_avg_sq, step) and updates it.  After
the update each owner broadcasts its parameters to its group (one flat broadcast per
owner, all launched before any wait).

Partition rule (deterministic, the same on every rank of a group because they hold the
same parameter names and shapes): within each kind (dense / expert), parameters are taken
largest first (``numel``, ties broken by their order in ``named_parameters()``) and each
goes to the group rank with the fewest elements so far (ties: the lowest rank) -- greedy
LPT bin packing over parameter FQNs.  ``owner[fqn]`` is the owner's global rank.

The update is torch's AdamW (``fused=True`` on CPU and CUDA) on the owned parameters, with
the single-process trainer's grouping (matrices decayed, 1-D parameters not), so every
element gets exactly the arithmetic the single-process optimizer applies to it.

Checkpoints: ``state_dict()`` is ``{fqn: {"exp_avg", "exp_avg_sq", "step"}}`` for the
parameters this rank owns (and that have state).  FQNs are global (pipeline stages keep
global layer indices, expert shards global expert indices), so the union of every rank's
dict (``merge_state_dicts``) is layout independent: ``load_state_dict`` takes that union
(or a list of per-rank dicts) under any DP / EP size and keeps the entries this rank owns
now.  Learning rate and betas come from the config / schedule, not the checkpoint.

Global gradient norm (``global_grad_norm``): squares of the gradients after the
data-parallel reduction, summed over the whole world, where each distinct gradient element
is counted on exactly one rank:

* replicated over dp / edp: only on its owner (ZeRO; ``DistributedOptimizer``) or on
  dp_rank 0 / edp_rank 0 (for a plain optimizer);
* tensor parallel: split parameters (``Placement.split``) on every TP rank, TP-replicated
  parameters (norms, router, sequence-parallel weights) on tp_rank 0 only;
* expert parallel: each EP rank holds different experts, all counted (by their edp owner);
* pipeline: stages hold different parameters, all counted; pass ``norm_params`` (e.g.
  ``pipeline.unique_parameters(chunks, pstate)``) to leave out a tied embedding's second
  copy.

Every rank returns the same norm; clipping multiplies every local gradient by
``min(1, max_norm / (norm + 1e-6))`` (torch's ``clip_grads_with_norm_``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..linear.expert_linear import per_expert_name, stacked_name
from ..model.expert_keys import per_expert_views, stack_expert_optimizer, unstack_expert_optimizer
from ..model.placement import Placement, named_placements
from .data_parallel import named_parameters, param_kind, replica_group

__all__ = ["DistributedOptimizer", "global_grad_norm", "greedy_partition", "merge_state_dicts", "named_parameters",
           "param_groups"]


def param_groups(params: Iterable[torch.Tensor], weight_decay: float, is_matrix=None) -> list[dict]:
    """AdamW groups: matrices decayed; norms, biases and other 1-D parameters not (each group
    in the given order, which is how torch numbers them in its state dict).  ``is_matrix(p)``
    (default: 2-D or more) -- stacked experts' (E, out) biases are vectors (``Placement.matrix``)."""
    is_matrix = is_matrix or (lambda p: p.dim() >= 2)
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if is_matrix(p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def greedy_partition(sizes: Sequence[int], n: int) -> list[int]:
    """Owner (0..n-1) of each item: largest first (ties: lower index), to the least-loaded
    bin (ties: lowest bin)."""
    owners, load = [0] * len(sizes), [0] * n
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(n), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


def _tp_counts(placement: Placement, pstate) -> bool:
    """A TP-split parameter counts on every TP rank (each holds other elements), a replicated one on rank 0."""
    return pstate.tp_rank == 0 or placement.split


def global_grad_norm(named: Iterable[tuple[str, torch.Tensor]], pstate, counts: Callable[[str, torch.Tensor], bool],
                     norm_params: Iterable[torch.Tensor] | None = None,
                     placements: dict[str, Placement] | None = None) -> torch.Tensor:
    """L2 norm of all gradients of the parallel model, the same on every rank (see module
    doc).  ``counts(name, p)``: whether this rank counts ``p`` (``DistributedOptimizer``'s rule).
    ``placements``: stacked experts' gradients are normed expert by expert (``per_expert_views``)."""
    allowed = None if norm_params is None else {id(p) for p in norm_params}
    named = list(named)
    grads = [(n, p.grad) for n, p in named
             if p.grad is not None and counts(n, p) and (allowed is None or id(p) in allowed)]
    grads = [g for _, g in per_expert_views(grads, placements or {})]
    dev = named[0][1].device if named else torch.device("cpu")
    world = pstate.group("world")
    if world is None or dist.get_world_size(world) == 1:  # one rank: exactly the single-process trainer's norm
        return torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=dev)
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    if grads:  # per-tensor norms in the gradients' precision, their squares summed in float64
        sq = torch.stack([v.double() for v in torch._foreach_norm(grads, 2.0)]).square().sum()
    dist.all_reduce(sq, group=world)
    return sq.sqrt().float()


def merge_state_dicts(states: Iterable[dict]) -> dict:
    """Union of per-rank ``DistributedOptimizer.state_dict()``s (within one layout the FQN
    keys are disjoint; on a duplicate the last one wins)."""
    out = {}
    for s in states:
        out.update(s)
    return out


def _adamw_state_by_fqn(named, optimizer: torch.optim.Optimizer) -> dict:
    """``{fqn: {"exp_avg", "exp_avg_sq", "step"}}`` (copies) for the named parameters with state."""
    out = {}
    for n, p in named:
        st = optimizer.state.get(p)
        if st:
            out[n] = {"exp_avg": st["exp_avg"].detach().clone(), "exp_avg_sq": st["exp_avg_sq"].detach().clone(),
                      "step": torch.as_tensor(st["step"]).detach().clone().float().cpu()}
    return out


def _only_complete_stacks(states: dict, placements: dict[str, Placement]) -> dict:
    """``states`` with, for each stacked parameter of ``placements``, exactly its experts'
    per-expert entries (those of experts other ranks hold dropped), renamed 0..n-1 for
    ``stack_expert_optimizer``; a stack missing an expert's entry is left out (no state)."""
    out = {k: v for k, v in states.items() if stacked_name(k) is None}
    for n, p in placements.items():
        if p.experts is None:
            continue
        rows = [states.get(per_expert_name(n, e)) for e in p.experts]
        if all(r is not None for r in rows):
            out.update({per_expert_name(n, j): r for j, r in enumerate(rows)})
    return out


class DistributedOptimizer:
    """ZeRO-1 AdamW; see module doc.  ``model``: the (expert-parallel) module, or a list of
    pipeline chunks.  ``param_groups`` exposes the inner torch groups (set ``lr`` there or
    with ``set_lr``)."""

    def __init__(self, model: nn.Module | Sequence[nn.Module], pstate, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool | None = None):
        self.pstate = pstate
        self.named = named_parameters(model)
        self.placements = named_placements(model if isinstance(model, nn.Module) else list(model))
        experts = {n for n, p in self.placements.items() if p.experts is not None}
        self.hparams = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        self.owner: dict[str, int] = {}  # fqn -> global rank of the owner
        self.owned_by: dict[str, dict[int, list[tuple[str, nn.Parameter]]]] = {}  # kind -> group rank -> params
        for kind in ("dp", "edp"):
            params = [(n, p) for n, p in self.named if param_kind(n, experts) == kind]
            _, size, _ = replica_group(pstate, kind)
            owners = greedy_partition([p.numel() for _, p in params], size)
            ranks = pstate.ranks.get(kind, [pstate.rank]) if size > 1 else [pstate.rank]
            self.owned_by[kind] = {r: [] for r in range(size)}
            for (n, p), r in zip(params, owners):
                self.owned_by[kind][r].append((n, p))
                self.owner[n] = ranks[r]
        self.owned = [(n, p) for n, p in self.named if self.owner[n] == pstate.rank]
        matrix = {id(p): self.placements[n].matrix for n, p in self.owned}
        groups = [g for g in param_groups((p for _, p in self.owned), weight_decay, lambda p: matrix[id(p)])
                  if g["params"]]
        if fused is None:
            dev = self.named[0][1].device if self.named else torch.device("cpu")
            fused = dev.type in ("cuda", "cpu")  # fused kernels exist for CUDA and CPU float32 params
        self.fused = fused
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused) if groups else None
        # a rank that owns nothing still takes lr updates from the schedule
        self._stub_groups = [{"params": [], "lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}]

    # -- torch-optimizer-like surface ---------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups if self.optimizer is not None else self._stub_groups

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self.named:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the owned parameters (those with a gradient), then ``sync_params``."""
        if self.optimizer is not None:
            self.optimizer.step()
        self.sync_params()

    @torch.no_grad()
    def sync_params(self) -> None:
        """Every owner broadcasts its (flattened) parameters to its dp / edp group."""
        pending = []
        for kind, by_rank in self.owned_by.items():
            group, size, _ = replica_group(self.pstate, kind)
            if size == 1:
                continue
            ranks = self.pstate.ranks[kind]
            for r, named in by_rank.items():
                if not named:
                    continue
                params = [p for _, p in named]
                flat = torch.cat([p.detach().reshape(-1) for p in params])
                pending.append((dist.broadcast(flat, src=ranks[r], group=group, async_op=True), flat, params,
                                ranks[r] == self.pstate.rank))
        for work, flat, params, mine in pending:
            work.wait()
            if mine:
                continue
            off = 0
            for p in params:
                p.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()

    # -- gradient norm --------------------------------------------------------------------------------
    def _counts(self, name: str, p: torch.Tensor) -> bool:
        return self.owner[name] == self.pstate.rank and _tp_counts(self.placements[name], self.pstate)

    def grad_norm(self, norm_params: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        return global_grad_norm(self.named, self.pstate, self._counts, norm_params, self.placements)

    def clip_grad_norm(self, max_norm: float, norm_params: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        """Global norm (same on every rank); clips every local gradient when max_norm > 0."""
        norm = self.grad_norm(norm_params)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for _, p in self.named], max_norm, norm)
        return norm

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{fqn: {"exp_avg", "exp_avg_sq", "step"}} for the owned parameters with state, stacked
        experts one by one under their per-expert fqns (as checkpoints key them)."""
        if self.optimizer is None:
            return {}
        return unstack_expert_optimizer(_adamw_state_by_fqn(self.owned, self.optimizer), self.placements)

    def checkpoint_placements(self) -> dict[str, Placement]:
        """The placement of each owned parameter under its ``state_dict`` fqn (each expert of a
        stack placed as its own linear)."""
        out = {}
        for n, _ in self.owned:
            p = self.placements[n]
            out.update({n: p} if p.experts is None else {per_expert_name(n, e): p.per_expert() for e in p.experts})
        return out

    def load_state_dict(self, states: dict | Sequence[dict], strict: bool = False) -> int:
        """Install the entries of ``states`` (a merged FQN dict or a list of per-rank dicts)
        for the parameters this rank owns; others are ignored.  ``strict``: every owned
        parameter must have an entry.  Returns how many were loaded."""
        if not isinstance(states, dict):
            states = merge_state_dicts(states)
        if self.optimizer is None:
            return 0
        loaded = 0
        states = stack_expert_optimizer(_only_complete_stacks(states, self.placements))
        for n, p in self.owned:
            st = states.get(n)
            if st is None:
                if strict:
                    raise KeyError(f"optimizer state for {n} missing from the checkpoint")
                self.optimizer.state.pop(p, None)
                continue
            if tuple(st["exp_avg"].shape) != tuple(p.shape):
                raise ValueError(f"optimizer state for {n}: shape {tuple(st['exp_avg'].shape)} != {tuple(p.shape)}")
            step_dev = p.device if (self.fused or self.param_groups[0].get("capturable")) else torch.device("cpu")
            self.optimizer.state[p] = {
                "step": torch.tensor(float(st["step"]), dtype=torch.float32, device=step_dev),
                "exp_avg": st["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": st["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
            }
            loaded += 1
        return loaded

    def __repr__(self) -> str:
        n_own = sum(p.numel() for _, p in self.owned)
        n_all = sum(p.numel() for _, p in self.named)
        return f"DistributedOptimizer(owned {len(self.owned)}/{len(self.named)} params, {n_own}/{n_all} elements)"
