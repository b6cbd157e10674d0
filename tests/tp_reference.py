"""Test-side references for tensor-parallel state: cut a full (one-process) state dict into a
rank's shards by the parameters' placements, join shards back, and the TP-only squared
gradient norm.  The package never needs these (checkpoints reshard through DCP); the
tests compare a TP model with the one-process model through them."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

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


def shard_state_dict(full_sd: dict, model: nn.Module, state) -> dict:
    """This rank's state dict for ``model`` cut from a full state dict: TP-split parameters
    sliced along their placement's dim, part by part, everything else copied."""
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k not in full_sd:
            raise KeyError(f"shard_state_dict: the full state dict has no {k!r}")
        src = full_sd[k]
        where = _placement(model, k)
        if where is not None and where.split:
            src = shard_tensor(src, where.dim, where.parts, state.tp, state.tp_rank)
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
