"""Tensor-parallel model construction and the sequence-parallel gradient sync.

    state = build_parallel_state(tp=2, sequence_parallel=True, model_cfg=cfg)
    factory = ParallelLinearFactory("ufp4", cfg.num_layers, state, seed=seed)
    model = build_tensor_parallel_gpt(cfg, factory, init_seed=seed)  # shards == the single-process init
    logits = model(tokens)                              # [b, s, V/tp] (this rank's vocab shard)
    loss = vocab_parallel_cross_entropy(logits, labels, state.group("tp"))
    loss.backward()
    sync_sequence_parallel_grads(model, state)          # after the DP grad sync, before clipping / step

Sequence parallelism is for dense layers: the factory refuses MoE expert / shared linears
when it is on (MoE flattens the tokens); TP without SP shards experts like dense MLPs.

``ParallelLinearFactory`` is a drop-in ``LinearFactory``: the same call sites get
column/row-parallel layers by ``kind``, with the per-module SR seeds of ``LinearFactory``
(``derive_sr_seed``), so every TP rank and the single-process model run the same
generator streams.  Its ``embedding`` / ``head`` methods make the vocabulary-parallel
embedding and output head (``GPTModel(..., **factory.model_kwargs())``).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..model.gpt import GPTModel
from ..model.layers import HeadRMSNorm
from ..model.linear_factory import LinearFactory
from ..model.placement import named_placements, placement_of
from .mappings import all_reduce
from .state import ParallelState, expert_range
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear
from .vocab_parallel import VocabParallelEmbedding, VocabParallelLMHead


class ParallelLinearFactory(LinearFactory):
    """``LinearFactory`` whose "column" / "row" linears are split over ``state``'s TP group."""

    def __init__(self, recipe, num_layers: int, state: ParallelState, backend: str = "emulated", seed: int = 0, *,
                 collect_stats: bool = False, step_context=None, schedule=None, device=None, dtype=None):
        super().__init__(recipe, num_layers, backend=backend, seed=seed, collect_stats=collect_stats,
                         step_context=step_context, schedule=schedule, device=device, dtype=dtype)
        if not isinstance(state, ParallelState):
            raise ValueError(f"ParallelLinearFactory needs a ParallelState (got {type(state).__name__})")
        self.state = state

    def build(self, in_features: int, out_features: int, *, kind: str, layer_index: int, name: str, bias: bool,
              parts: int, in_moe: bool, device) -> nn.Module:
        full_name = f"layers.{layer_index}.{name}"
        if self.state.sequence_parallel and self.state.tp > 1 and in_moe:
            raise ValueError(f"{full_name}: sequence parallelism does not support MoE layers (their tokens are "
                             "flattened); set parallel.sequence_parallel=false")
        common = dict(recipe=self.recipe, state=self.state, layer_index=layer_index, num_layers=self.num_layers,
                      sr_seed=self.sr_seed(layer_index, name), backend=self.backend, name=full_name,
                      collect_stats=self.collect_stats, step_context=self.step_context, device=device,
                      dtype=self.dtype)
        if kind == "column":
            module = ColumnParallelLinear(in_features, out_features, bias, partition_stride=parts, **common)
        else:
            module = RowParallelLinear(in_features, out_features, bias, **common)
        return self.with_phases(module, full_name)

    def local_experts(self, num_experts: int) -> range:
        """This rank's share of a layer's routed experts (``expert_range``)."""
        return expert_range(num_experts, self.state.ep, self.state.ep_rank)

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return VocabParallelEmbedding(num_embeddings, embedding_dim, state=self.state, device=self.device,
                                      dtype=self.dtype)

    def head(self, in_features: int, out_features: int) -> nn.Module:
        return VocabParallelLMHead(in_features, out_features, state=self.state, device=self.device, dtype=self.dtype)

    def model_kwargs(self) -> dict:
        """Keyword arguments of ``GPTModel`` that make its embedding and head vocabulary-parallel."""
        return {"embedding_factory": self.embedding, "head_factory": self.head}

    def __repr__(self) -> str:
        st = self.state
        return (f"ParallelLinearFactory(recipe={self.recipe.name}, num_layers={self.num_layers}, "
                f"backend={self.backend}, seed={self.seed}, tp={st.tp_rank}/{st.tp}, "
                f"sequence_parallel={st.sequence_parallel})")


# -- model construction -------------------------------------------------------------------------
def attach_placements(model: nn.Module, state: ParallelState) -> None:
    """Complete the ``Placement`` of every parameter of ``model`` (a rank's model or chunk)
    with what the layout decides: whether its gradient is a partial sum over TP -- with
    sequence parallelism every parameter that is not split (norms, row-parallel biases)
    sees only this rank's tokens; with TP > 1 a QK-norm weight (``HeadRMSNorm``, shared by
    all heads) sees only this rank's heads.  What the modules declared stays: the
    tensor-parallel layers their split, a routed expert's ``SwiGLU`` its expert."""
    for m in model.modules():
        for attr, _ in m.named_parameters(recurse=False):
            p = placement_of(m, attr)
            partial = (state.tp > 1 and isinstance(m, HeadRMSNorm)) or (state.sequence_parallel and not p.split)
            if partial != p.partial_grad:
                m.placements = {**getattr(m, "placements", {}), attr: dataclasses.replace(p, partial_grad=partial)}


def build_tensor_parallel_gpt(config, factory: ParallelLinearFactory, *, init_seed: int | None = None,
                              device=None) -> GPTModel:
    """A TP ``GPTModel`` whose shards equal the single-process model built with the same
    ``init_seed`` (None: drawn from torch's global generator, as ``GPTModel`` does), by
    construction: initialisation is keyed by global name and index (model/init.py), so no
    rank ever builds the full model."""
    device = device if device is not None else factory.device
    model = GPTModel(config, factory, init_seed=init_seed, device=device, **factory.model_kwargs())
    attach_placements(model, factory.state)
    return model


# -- gradients -----------------------------------------------------------------------------------
def sync_sequence_parallel_grads(model: nn.Module, state: ParallelState) -> int:
    """Sum the gradients of parameters placed with ``partial_grad`` over the TP group (one
    coalesced FP32 all-reduce).  Call after the last micro-batch's backward and after
    ``DataParallel.finish_grad_sync`` (which overwrites ``.grad``; both are sums, so the
    order does not change the result), before clipping and the optimizer step.  Returns
    the count synced."""
    group = state.group("tp")
    partial = named_placements(model)
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None and partial[n].partial_grad]
    if not grads or state.tp == 1 or group is None:
        return len(grads)
    flat = all_reduce(torch.cat([g.reshape(-1).float() for g in grads]), group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return len(grads)


# -- shards ------------------------------------------------------------------------------------
def shard_tensor(full: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s TP shard of ``full``: its slice of each of the ``stride`` parts along ``dim``."""
    parts = full.chunk(stride, dim=dim)
    return torch.cat([p.chunk(tp, dim=dim)[rank] for p in parts], dim=dim).contiguous()


__all__ = ["ParallelLinearFactory", "attach_placements", "build_tensor_parallel_gpt", "shard_tensor",
           "sync_sequence_parallel_grads"]
