"""Test-side references for tensor-parallel state: cut a full (one-process) state dict into a
rank's shards by the parameters' placements, join shards back, and the TP-only squared
gradient norm.  The package never needs these (checkpoints reshard through DCP); the
tests compare a TP model with the one-process model through them."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_ufp4.linear.expert_linear import per_expert_name
from megatron_ufp4.model.placement import named_placements, placement_of
from megatron_ufp4.parallel.mappings import all_reduce
from megatron_ufp4.parallel.parallel_factory import shard_tensor


def unshard_tensor(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``shard_tensor``: the full tensor from every rank's shard (in rank order)."""
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][p] for p in range(stride) for r in range(len(shards))], dim=dim)


def _placement(model: nn.Module, key: str):
    """The placement of the parameter a state-dict key names (None: a buffer or extra state)."""
    prefix, _, attr = key.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    return placement_of(module, attr) if attr in module._parameters else None


def _held_experts(model: nn.Module, key: str):
    """The global experts a stacked-expert module holds, for its extra-state key (None: another key)."""
    prefix, _, attr = key.rpartition(".")
    if attr != "_extra_state":
        return None
    held = getattr(model.get_submodule(prefix) if prefix else model, "experts", None)
    return held if isinstance(held, tuple) else None


def _full_value(full_sd: dict, key: str, experts):
    """``full_sd[key]``; for stacked experts also from a per-expert keyed full state dict (the
    checkpoint form, ``...experts.<e>.gate_up.weight``): the experts ``experts`` stacked."""
    if key in full_sd:
        return full_sd[key]
    if experts is not None:
        per = [per_expert_name(key, e) for e in experts]
        if per and all(k in full_sd for k in per):
            if key.endswith("_extra_state"):
                return {e: full_sd[k] for e, k in zip(experts, per)}
            return torch.stack([full_sd[k] for k in per])
    raise KeyError(f"shard_state_dict: the full state dict has no {key!r}")


def shard_state_dict(full_sd: dict, model: nn.Module, state) -> dict:
    """This rank's state dict for ``model`` cut from a full state dict: stacked routed experts
    cut to the experts the rank holds (their global indices, dim 0: ``placement.experts``),
    TP-split parameters sliced along their placement's dim, part by part, extra state of
    stacked experts kept for the held experts, everything else copied.  ``full_sd`` is a
    one-process model's (stacked experts 0..E-1), or keyed per expert as checkpoints are."""
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        where = _placement(model, k)
        held = where.experts if where is not None else _held_experts(model, k)
        src = _full_value(full_sd, k, held)
        if held is not None and k.endswith("_extra_state"):
            if not isinstance(src, dict) or not set(held) <= set(src):
                raise KeyError(f"shard_state_dict: {k!r} of the full state dict lacks experts of {held}")
            src = {e: src[e] for e in held}
        elif where is not None and where.experts is not None:
            if src.shape[0] == where.global_shape[0]:  # a whole layer (experts 0..E-1): the held ones
                src = src[list(held)]
            elif k in full_sd:  # (stacked from per-expert keys: the held experts already)
                raise ValueError(f"shard_state_dict: {k!r} stacks {src.shape[0]} experts, the layer "
                                 f"{where.global_shape[0]}")
        if where is not None and where.split:
            src = shard_tensor(src, where.dim, where.parts, state.tp, state.tp_rank)
        if where is not None:
            assert src.shape == v.shape, (k, tuple(src.shape), tuple(v.shape))
        out[k] = src
    return out


def gather_state_dict(model: nn.Module, state) -> dict:
    """The full state dict of a TP model, on every TP rank (collective over TP)."""
    group = state.group("tp")
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor):
            t = v.detach()
            where = _placement(model, k)
            if where is not None and where.split and state.tp > 1 and group is not None:
                shards = [torch.empty_like(t) for _ in range(state.tp)]
                dist.all_gather(shards, t.contiguous(), group=group)
                t = unshard_tensor(shards, where.dim, where.parts)
            out[k] = t
        else:
            out[k] = v
    return out


def tp_grad_sq_norm(model: nn.Module, state) -> torch.Tensor:
    """Squared L2 norm of a TP model's gradients summed over TP: split parameters on every
    rank, replicated ones once (rank 0)."""
    placements = named_placements(model)
    named = list(model.named_parameters())
    dev = named[0][1].device if named else torch.device("cpu")
    total = torch.zeros((), device=dev, dtype=torch.float32)
    for n, p in named:
        if p.grad is not None and (placements[n].split or state.tp_rank == 0):
            total = total + p.grad.detach().float().pow(2).sum()
    return all_reduce(total, state.group("tp")) if state.tp > 1 else total
