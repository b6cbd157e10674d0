"""Activation recomputation, with Megatron-LM's names and meanings (``training.recompute_*``).

- ``selective``: every layer's core attention (``CoreAttention``: softmax(QK^T)V, the activations
  that grow with T^2 where no fused kernel keeps them out) keeps no activations and is recomputed
  in backward; nothing else is.  Megatron-LM's default ``--recompute-modules core_attn``.
- ``full``: whole transformer layers (attention and MLP / MoE, the MTP blocks included) keep only
  their input.  ``recompute_method``: ``uniform`` recomputes every layer (groups of one layer:
  ``recompute_num_layers`` must be 1), ``block`` the first ``recompute_num_layers`` layers of
  each model chunk (pipeline stage or virtual stage) and no others.

Recomputation is applied to built chunks from outside (``torch.distributed._composable.checkpoint``:
forward hooks, no wrapper module, so parameter names and checkpoints are unchanged) and is exact:
the recomputed forward runs with the ``StepContext`` its first run saw (a pipeline schedule
moves it on to later micro-batches in between), so its GEMMs quantize with the same phase, SR
keys and positions, and with ``recomputing`` set, so no side effect happens twice (telemetry
logs, MoE load counts and the ``last_*`` values logs read).  What else a forward reads must not
change between a micro-batch's forward and its backward, as the trainer guarantees: telemetry
on/off, the precision phase and the MoE expert bias change at step boundaries only, autocast is
the same in both.  A forward with gradients needs a training position (``StepContext.at``): SR keys
drawn from a layer's generator instead could not be drawn again.  One backward per forward (a
second backward through ``retain_graph`` would recompute twice and is refused).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn
from torch.distributed._composable import checkpoint

from ..linear.step_context import StepContext

GRANULARITIES = ("none", "selective", "full")
METHODS = ("uniform", "block")


def _assign(dst: StepContext, src: StepContext) -> None:
    for f in dataclasses.fields(StepContext):
        setattr(dst, f.name, getattr(src, f.name))


def replay_context(step_context: StepContext):
    """``context_fn`` for checkpoint: the first forward runs as it is; the recomputation runs with
    a copy of the StepContext taken at that first forward, marked ``recomputing``, and leaves
    the live one as it found it."""
    def context_fn():
        if step_context.step is None and torch.is_grad_enabled():
            raise RuntimeError("activation recomputation needs the training position of each forward "
                               "(StepContext.at(step, micro_batch)): the trainer sets it")
        seen = dataclasses.replace(step_context, recomputing=True)

        @contextlib.contextmanager
        def recomputation():
            if step_context.recomputing:
                raise RuntimeError("a recomputation started inside another (a second backward through a "
                                   "recomputed region is not supported)")
            now = dataclasses.replace(step_context)
            _assign(step_context, seen)
            try:
                yield
            finally:
                _assign(step_context, now)
        return contextlib.nullcontext(), recomputation()
    return context_fn


def transformer_layers(chunk: nn.Module) -> list[nn.Module]:
    """A chunk's transformer layers in order: its main-stack layers, then its MTP blocks."""
    layers = list(chunk.layers.values())
    if getattr(chunk, "mtp", None) is not None:
        layers += [m.block for m in chunk.mtp]
    return layers


def apply_recompute(chunks, granularity: str, method: str = "uniform", num_layers: int = 1) -> int:
    """Make ``chunks`` (built model chunks) recompute activations as configured; returns how many
    modules recompute."""
    if granularity not in GRANULARITIES or method not in METHODS:
        raise ValueError(f"recompute: granularity {granularity!r} / method {method!r} not in {GRANULARITIES} / "
                         f"{METHODS}")
    count = 0
    for chunk in chunks:
        if granularity == "none":
            continue
        context_fn = replay_context(chunk.step_context)
        layers = transformer_layers(chunk)
        if granularity == "selective":
            targets = [layer.attn.core for layer in layers]
        else:
            targets = layers if method == "uniform" else layers[:num_layers]
        for module in targets:
            # no RNG state to keep: forwards draw from no global generator (SR keys are hashes of positions)
            checkpoint(module, context_fn=context_fn, preserve_rng_state=False)
        count += len(targets)
    return count


def kept_activation_bytes(module: nn.Module, *inputs, regions=()) -> int:
    """Bytes a forward of ``module`` leaves for backward: the distinct storages autograd saves
    outside recomputed regions, plus the inputs the recomputed ``regions`` keep to run again
    (parameters and buffers excluded).  What the planner's activation formula is checked against."""
    params = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen = {}

    def note(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    hooks = [m.register_forward_pre_hook(lambda _, args: [note(a) for a in args if torch.is_tensor(a)] and None)
             for m in regions]
    try:
        with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values())
