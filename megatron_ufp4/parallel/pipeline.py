"""Pipeline parallelism, part one: which layers each (virtual) stage holds, and its chunk.

    ranges = stage_layer_ranges(num_layers, pp, vpp)            # global layer indices per virtual stage
    chunks = build_stage_modules(model, state)                   # this rank's model chunk(s)

Layer split.  Virtual stage ``s`` (of ``pp * vpp``) holds a contiguous run of layers; the
counts are equal unless ``first_stage_layers`` / ``last_stage_layers`` pin the first / last
virtual stage (Megatron's ``decoder_first/last_pipeline_num_layers``: fewer layers next to
the embedding or the output head balances their cost); the remaining layers must then split
evenly over the remaining stages.  Interleaving (Megatron's assignment): model chunk ``c``
on pipeline rank ``r`` is virtual stage ``c * pp + r``.  The embedding lives on virtual stage
0 (pipeline rank 0, chunk 0), final norm and head on the last virtual stage (rank pp-1, last
chunk).

A chunk is a ``GPTModel`` itself, with the parts it does not hold removed (as TorchTitan
does): ``layers`` keeps only its global indices (a ``ModuleDict`` keyed by them), ``embed``
is ``None`` off the first stage, ``norm`` and ``head`` are ``None`` off the last.  Its
``state_dict()`` keys are the single-process model's for what it holds, the union over the
stages is the full model's state dict, and ``forward`` is the model's own.  Each chunk
carries ``stage_index`` / ``num_stages``.  The schedules that run chunks are in
pipeline_schedule.py.

Specification: docs/parallel.md.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..model.gpt import GPTModel
from .state import ParallelState

# -- layer split ---------------------------------------------------------------------------------
def stage_layer_ranges(num_layers: int, pp: int, vpp: int = 1, first_stage_layers: int | None = None,
                       last_stage_layers: int | None = None) -> list[range]:
    """Global layer indices of each of the ``pp * vpp`` virtual stages, in pipeline order.

    Equal counts, unless ``first_stage_layers`` / ``last_stage_layers`` fix the first / last
    virtual stage's count (0 is allowed: a stage with only the embedding or only the head);
    the other stages then share the remaining layers equally, at least one each.
    Impossible splits raise a one-line ``ValueError``.
    """
    for name, v in (("num_layers", num_layers), ("pipeline", pp), ("virtual_pipeline", vpp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer (got {v!r})")
    if vpp > 1 and pp == 1:
        raise ValueError(f"virtual_pipeline={vpp} needs pipeline > 1 (interleaving spreads chunks over ranks)")
    n = pp * vpp
    fixed = {}
    for name, v, stage in (("first_stage_layers", first_stage_layers, 0),
                           ("last_stage_layers", last_stage_layers, n - 1)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= num_layers:
            raise ValueError(f"{name} must be an integer in [0, num_layers={num_layers}] (got {v!r})")
        if stage in fixed and fixed[stage] != v:
            raise ValueError(f"first_stage_layers={first_stage_layers} and last_stage_layers={last_stage_layers} "
                             f"pin the same (only) stage to different counts")
        fixed[stage] = v
    if n == 1 and fixed and fixed[0] != num_layers:
        raise ValueError(f"a single stage holds all num_layers={num_layers} layers (got {fixed[0]})")
    rest, free = num_layers - sum(fixed.values()), n - len(fixed)
    if rest < 0:
        raise ValueError(f"first_stage_layers + last_stage_layers = {sum(fixed.values())} exceeds "
                         f"num_layers={num_layers}")
    if free == 0:
        if rest:
            raise ValueError(f"first_stage_layers + last_stage_layers = {sum(fixed.values())} must equal "
                             f"num_layers={num_layers} with {n} stages")
        per = 0
    else:
        if rest < free:
            raise ValueError(f"{rest} layers cannot give each of the {free} remaining (virtual) pipeline stages "
                             f"a layer (num_layers={num_layers}, pipeline={pp}, virtual_pipeline={vpp})")
        if rest % free:
            raise ValueError(f"{rest} layers do not split evenly over {free} (virtual) pipeline stages "
                             f"(num_layers={num_layers}, pipeline={pp}, virtual_pipeline={vpp}); set "
                             f"first_stage_layers / last_stage_layers to make the split even")
        per = rest // free
    out, start = [], 0
    for s in range(n):
        count = fixed.get(s, per)
        out.append(range(start, start + count))
        start += count
    return out


def virtual_stage_of(chunk: int, pp_rank: int, pp: int) -> int:
    """Megatron's interleaved assignment: chunk c on pipeline rank r is virtual stage c * pp + r."""
    return chunk * pp + pp_rank


# -- stage modules -------------------------------------------------------------------------------
def stage_chunk(model: GPTModel, layer_indices: Sequence[int], stage_index: int, num_stages: int) -> GPTModel:
    """The same model with only ``layer_indices`` (global) and, on the first / last stage,
    the embedding / final norm and head; shares the kept modules with ``model``."""
    chunk = copy.copy(model)  # same class and attributes; the module dicts are copied below
    chunk._parameters, chunk._buffers, chunk._modules = (dict(model._parameters), dict(model._buffers),
                                                         dict(model._modules))
    chunk._modules["layers"] = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_indices})
    if stage_index != 0 and not (stage_index == num_stages - 1 and model.mtp is not None):
        chunk._modules["embed"] = None  # the last stage keeps a copy when MTP embeds tokens there
    if stage_index != num_stages - 1:
        chunk._modules["norm"] = chunk._modules["head"] = None
        if "mtp" in chunk._modules:
            chunk._modules["mtp"] = None
    chunk.stage_index, chunk.num_stages = stage_index, num_stages
    return chunk


def layer_indices(chunk: nn.Module) -> list[int]:
    """Global indices of the transformer layers a model (chunk) holds."""
    return [int(k) for k in chunk.layers]


def build_stage_modules(model: GPTModel, state: ParallelState | None = None, *, pp: int | None = None,
                        pp_rank: int | None = None, vpp: int | None = None,
                        first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                        device=None) -> list[GPTModel]:
    """This rank's model chunks (``vpp`` of them, chunk order) cut out of a full ``GPTModel``.

    ``model`` must be built identically on every rank (same seed, same factory), either
    normally (the chunks share its parameter objects; drop ``model`` afterwards so the other
    layers are freed) or on the meta device (``with torch.device("meta"): GPTModel(cfg, factory)``): then
    only this rank's modules are materialised on ``device`` and initialised; the weights
    equal a normally built model's bit for bit (layout-independent init, model/init.py).
    Placements (module metadata) survive materialisation.
    ``pp`` / ``pp_rank`` / ``vpp`` default to ``state``'s.
    """
    pp = pp if pp is not None else (state.pp if state is not None else 1)
    pp_rank = pp_rank if pp_rank is not None else (state.pp_rank if state is not None else 0)
    vpp = vpp if vpp is not None else (state.vpp if state is not None else 1)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} is outside pipeline={pp}")
    ranges = stage_layer_ranges(model.config.num_layers, pp, vpp, first_stage_layers, last_stage_layers)
    n = pp * vpp
    mine = [virtual_stage_of(c, pp_rank, pp) for c in range(vpp)]
    on_meta = [p.is_meta for p in model.parameters()]
    if any(on_meta) and not all(on_meta):
        raise ValueError("build_stage_modules: the model is only partly on the meta device; build it under "
                         "`with torch.device('meta'):` (a LinearFactory without device= makes real linears)")
    if any(on_meta) and device is None:
        raise ValueError("build_stage_modules: a model on the meta device needs device= to materialise on")
    chunks = [stage_chunk(model, ranges[s], s, n) for s in mine]
    if any(on_meta):
        _materialise(chunks, torch.device(device))
    return chunks


@torch.no_grad()
def _materialise(chunks: list[GPTModel], device) -> None:
    """Allocate this rank's chunks of a meta-device model on ``device`` and initialise them.
    Initialisation is keyed by global name and index, so the values are the normally built
    model's without touching (or allocating) the layers other ranks hold."""
    for chunk in chunks:
        chunk.to_empty(device=device)
        chunk.init_weights()


def unique_parameters(stage_modules: Sequence[nn.Module], state: ParallelState | None = None) -> list[nn.Parameter]:
    """The parameters to count in a pipeline-wide gradient norm: everything the chunks hold,
    except the last stage's copy of the embedding (tied head, or MTP's) when the first stage
    holds the other."""
    pp = state.pp if state is not None else 1
    params, seen = [], set()
    for m in stage_modules:
        skip = None
        if pp > 1 and m.stage_index != 0:
            skip = m.embed.weight if m.embed is not None else (
                m.head.weight if m.config.tie_embeddings and m.head is not None else None)
        for p in m.parameters():
            if p is not skip and id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                params.append(p)
    return params



__all__ = ["build_stage_modules", "layer_indices", "stage_chunk", "stage_layer_ranges", "unique_parameters",
           "virtual_stage_of"]
