"""Pipeline parallelism: layer split, stage modules, and 1F1B / interleaved 1F1B / GPipe schedules.

Three pieces::

    ranges = stage_layer_ranges(num_layers, pp, vpp)            # global layer indices per virtual stage
    stages = build_stage_modules(model, state)                   # this rank's model chunk(s)
    runner = PipelineRunner(stages, state, schedule="1f1b", num_microbatches=8,
                            micro_batch_size=4, seq_len=2048)
    loss = runner.step(tokens if state.is_first_stage else None,
                       labels if state.is_last_stage else None)  # fwd+bwd of one global batch

Layer split.  Virtual stage ``s`` (of ``pp * vpp``) holds a contiguous run of layers; the
counts are equal unless ``first_stage_layers`` / ``last_stage_layers`` pin the first / last
virtual stage (Megatron's ``decoder_first/last_pipeline_num_layers``: fewer layers next to
the embedding or the output head balances their cost); the remaining layers must then split
evenly over the remaining stages.  Interleaving (Megatron's assignment): model chunk ``c``
on pipeline rank ``r`` is virtual stage ``c * pp + r``.  The embedding lives on virtual stage
0 (pipeline rank 0, chunk 0), final norm and head on the last virtual stage (rank pp-1, last
chunk).

Stage modules keep GLOBAL parameter names: ``GPTStage.layers`` is an ``nn.ModuleDict`` keyed
by the global layer index, so a stage's ``state_dict()`` keys are exactly the single-process
``GPTModel``'s keys for the parameters it holds (``embed.weight``, ``layers.7.attn.qkv.weight``,
``norm.weight``, ``head.weight``); the union over the stages is the full model's state dict.

Schedules: ``torch.distributed.pipelining`` (``PipelineStage`` + ``Schedule1F1B`` /
``ScheduleInterleaved1F1B`` / ``ScheduleGPipe``), which runs on gloo as well as NCCL.  Two
choices make it reproduce the single-process trainer:

* Static stage metadata.  Every ``PipelineStage`` gets ``input_args`` / ``output_args`` (meta
  tensors of the micro-batch shapes), so the library skips its *dynamic* shape inference.
  That inference runs an extra real forward and an input-gradient backward of each stage on
  the first micro-batch (on uninitialised buffers for non-first stages); here it would
  advance every quantized linear's stochastic-rounding generator (the Dgrad/Wgrad GEMMs draw
  SR keys), add to the MoE load counters and could feed NaNs through routers.  Static shapes
  are why the runner needs ``micro_batch_size`` and ``seq_len`` up front.
* Loss scaling in the loss, not in the gradients.  The schedules get ``scale_grads=False``
  and a loss function that returns ``loss_fn(logits, labels) / num_microbatches``; MoE aux
  losses get ``set_aux_loss_scale(1 / num_microbatches)``.  That is exactly what the
  single-process ``Trainer`` does (the library's default instead divides the accumulated
  gradients afterwards, which rounds differently).

With both, each module sees the same operations on the same values in the same per-module
order as in one process (forwards of micro-batches 0..n-1, backwards of 0..n-1; SR keys are
drawn only in backward, per module), so PP=2 results matched the single-process trainer
bit for bit in the tests (fp32 bf16-recipe and ufp4 recipe, dense and MoE, all three
schedules).  The one place where the sum order necessarily changes is a tied embedding
(``tie_embeddings``): the first and last stage each hold a copy, and their gradient
contributions are added by an all-reduce after the schedule instead of inside autograd
(agreement ~1e-9 rather than bitwise).

Limitation (SR in the forward): bit-equality with one process relies on every SR key being
drawn in backward.  A recipe that also rounds ``x`` or ``w`` stochastically draws keys in
forward too, and a module's sequential generator then sees forward and backward draws
interleaved differently (1F1B: F0 F1 B0 F2 B1 ...; GPipe: all F then all B; one process:
F0 B0 F1 B1 ...): results stay statistically equivalent but not equal (measured with
``sr: [x, dy]``: loss off by ~2e-4, per-tensor relative gradient differences up to ~0.3
on the tiny test model, i.e. different SR noise).  Keys derived from (micro-batch, GEMM)
counters instead of sequential draws would remove this (a QuantizedLinear change).

Gradient bookkeeping left to the training loop: gradients *accumulate* into ``.grad`` (zero
them after the optimizer step, as the single-process trainer does); data-parallel reduction
is not done here; for gradient clipping the squared norm must be summed over the pipeline
group, counting the last stage's tied ``head.weight`` copy out (``unique_parameters``).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..fp4.sr_random import set_sr_position
from ..model.gpt import GPTModel
from ..model.moe import set_aux_loss_scale
from .state import ParallelState, rank_of

SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")


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
class GPTStage(nn.Module):
    """One model chunk: [embedding] -> some transformer blocks -> [final norm -> head].

    Attribute names match ``GPTModel``'s, ``layers`` is an ``nn.ModuleDict`` keyed by the
    global layer index, so ``state_dict()`` keys are the single-process model's.  ``forward``
    maps tokens (first stage) or hidden states (B, T, hidden) to hidden states or, on the
    last stage, float32 logits.  ``autocast_dtype`` (e.g. torch.bfloat16) runs the forward
    under autocast, as the single-process trainer does around ``model(tokens)``.
    """

    def __init__(self, model: GPTModel, layer_indices: Sequence[int], stage_index: int, num_stages: int):
        super().__init__()
        self.sr_counter: list[int] | None = None  # set by PipelineRunner.step
        self.config = model.config
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.embed = model.embed if self.is_first else None
        self.rope = model.rope  # shared by the attention modules; non-persistent buffers only
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_indices})
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.autocast_dtype: torch.dtype | None = None

    @property
    def layer_indices(self) -> list[int]:
        return [int(k) for k in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sr_counter is not None:  # [step, first micro-batch, forwards so far]: SR position
            step, base, n = self.sr_counter
            set_sr_position(step, base + n)
            self.sr_counter[2] += 1
        dev = x.device.type
        ctx = torch.autocast(dev, dtype=self.autocast_dtype) if self.autocast_dtype is not None else nullcontext()
        with ctx:
            h = self.embed(x) if self.embed is not None else x
            for layer in self.layers.values():
                h = layer(h)
            if self.norm is not None:
                h = self.norm(h)
            return self.head(h).float() if self.head is not None else h

    # the MoE helpers work on whatever this chunk holds
    moe_layers = GPTModel.moe_layers
    moe_stats = GPTModel.moe_stats
    update_expert_bias = GPTModel.update_expert_bias
    discard_expert_loads = GPTModel.discard_expert_loads

    def extra_repr(self) -> str:
        idx = self.layer_indices
        span = f"{idx[0]}..{idx[-1]}" if idx else "none"
        return f"stage={self.stage_index}/{self.num_stages}, layers={span}"


def build_stage_modules(model: GPTModel, state: ParallelState | None = None, *, pp: int | None = None,
                        pp_rank: int | None = None, vpp: int | None = None,
                        first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                        device=None) -> list[GPTStage]:
    """This rank's model chunks (``vpp`` of them, chunk order) cut out of a full ``GPTModel``.

    ``model`` must be built identically on every rank (same seed, same factory), either
    normally (the chunks share its parameter objects; drop ``model`` afterwards so the other
    layers are freed) or on the meta device (``with torch.device("meta"): GPTModel(cfg, factory)``): then
    only this rank's modules are materialised on ``device`` and initialised by replaying the
    full model's init RNG sequence, so the weights equal a normally built model's bit for
    bit (the other layers are initialised one at a time into scratch memory and discarded).
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
    if any(on_meta):
        if device is None:
            raise ValueError("build_stage_modules: a model on the meta device needs device= to materialise on")
        keep = {i for s in mine for i in ranges[s]}
        _materialise(model, keep_embed=0 in mine, keep_layers=keep, keep_last=(n - 1) in mine,
                     device=torch.device(device))
    return [GPTStage(model, ranges[s], s, n) for s in mine]


@torch.no_grad()
def _materialise(model: GPTModel, keep_embed: bool, keep_layers: set, keep_last: bool, device) -> None:
    """Allocate and initialise the kept modules of a meta-device model, consuming the global
    RNG exactly as building the whole model on ``device`` does: first the constructors' draws
    (every parameter holder's ``reset_parameters``, in construction order), then
    ``GPTModel.init_weights``'s.  Modules not kept are initialised into scratch memory one at
    a time and moved back to the meta device."""
    cfg = model.config
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.num_layers)
    tied = cfg.tie_embeddings
    meta = torch.device("meta")

    def to_meta(m: nn.Module, recurse: bool = True) -> None:
        m._apply(lambda t: t.to(meta), recurse=recurse)

    # 1. the constructors' draws (nn.Embedding normal_, kaiming_uniform_ of every linear)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and next(m.parameters(recurse=False), None) is not None:
            m.to_empty(device=device, recurse=False)
            m.reset_parameters()
            to_meta(m, recurse=False)
    # 2. init_weights' draws, in its order
    w = nn.init.normal_(torch.empty(model.embed.weight.shape, dtype=model.embed.weight.dtype, device=device),
                        mean=0.0, std=std)
    if keep_embed or (tied and keep_last):
        model.embed.to_empty(device=device)
        model.embed.weight.copy_(w)
    if tied:
        model.head.weight = model.embed.weight
    del w
    for i, layer in enumerate(model.layers):
        layer.to_empty(device=device)  # also the shared rope (re-made below)
        layer.init_weights(std, out_std)
        if i not in keep_layers:
            to_meta(layer)  # scratch: only its RNG draws mattered
    model.rope.to_empty(device=device)
    model.rope.reset_parameters()
    if keep_last:
        model.norm.to_empty(device=device)
        model.norm.reset_parameters()
    if not tied:
        w = nn.init.normal_(torch.empty(model.head.weight.shape, dtype=model.head.weight.dtype, device=device),
                            mean=0.0, std=std)
        if keep_last:
            model.head.to_empty(device=device)
            model.head.weight.copy_(w)


def unique_parameters(stage_modules: Sequence[nn.Module], state: ParallelState | None = None) -> list[nn.Parameter]:
    """The parameters to count in a pipeline-wide gradient norm: everything the chunks hold,
    except the last stage's copy of a tied embedding when the first stage holds the other."""
    pp = state.pp if state is not None else 1
    params, seen = [], set()
    for m in stage_modules:
        skip = None
        if pp > 1 and m.config.tie_embeddings and m.head is not None and m.embed is None:
            skip = m.head.weight
        for p in m.parameters():
            if p is not skip and id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                params.append(p)
    return params


# -- schedules -----------------------------------------------------------------------------------
def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one micro-batch (the trainer's loss)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


class PipelineRunner:
    """Runs forward + backward of one global batch over the pipeline group.

    ``stage_modules``: this rank's chunks from ``build_stage_modules`` (one, or ``vpp`` for
    ``schedule="interleaved_1f1b"``).  ``loss_fn(logits, labels)`` is a micro-batch's mean
    loss; the runner divides it by ``num_microbatches`` (and sets the MoE aux-loss scale to
    ``1 / num_microbatches``) so gradients equal the single-process trainer's.
    ``micro_batch_size`` / ``seq_len`` fix the activation shapes sent between stages
    (``activation_shape`` overrides the (micro_batch_size, seq_len, hidden) default, e.g.
    for sequence-parallel shards).  ``autocast_dtype`` runs the stage forwards under autocast.

    All ranks of the world must construct their runners together (a tied embedding creates
    process groups).  With pipeline size 1 no communication happens: ``step`` runs the
    micro-batches one after another like the single-process trainer.
    """

    def __init__(self, stage_modules: Sequence[GPTStage], state: ParallelState, *, schedule: str = "1f1b",
                 num_microbatches: int, micro_batch_size: int, seq_len: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
                 activation_dtype: torch.dtype = torch.float32, activation_shape: tuple[int, ...] | None = None,
                 autocast_dtype: torch.dtype | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule must be one of {SCHEDULES} (got {schedule!r})")
        stage_modules = list(stage_modules)
        if not stage_modules:
            raise ValueError("PipelineRunner needs at least one stage module")
        if num_microbatches < 1 or micro_batch_size < 1 or seq_len < 1:
            raise ValueError(f"num_microbatches, micro_batch_size and seq_len must be >= 1 (got "
                             f"{num_microbatches}, {micro_batch_size}, {seq_len})")
        pp, vpp = state.pp, len(stage_modules)
        if schedule != "interleaved_1f1b" and vpp != 1:
            raise ValueError(f"schedule {schedule} runs one model chunk per rank, got {vpp}; "
                             f"use interleaved_1f1b for virtual pipeline stages")
        for c, m in enumerate(stage_modules):
            want = virtual_stage_of(c, state.pp_rank, pp)
            if m.stage_index != want or m.num_stages != pp * vpp:
                raise ValueError(f"chunk {c} on pipeline rank {state.pp_rank} must be virtual stage {want} of "
                                 f"{pp * vpp} (got {m.stage_index} of {m.num_stages}); build it with "
                                 f"build_stage_modules(model, state) and vpp={vpp}")
        if schedule == "1f1b" and pp > 1 and num_microbatches < pp:
            raise ValueError(f"schedule 1f1b needs num_microbatches >= pipeline={pp} (got {num_microbatches}); "
                             f"use gpipe or more micro-batches")
        if schedule == "interleaved_1f1b":
            rounds = max(1, num_microbatches // pp)
            if num_microbatches % rounds:
                raise ValueError(f"interleaved_1f1b with pipeline={pp} needs num_microbatches divisible by "
                                 f"max(1, num_microbatches // pipeline) = {rounds} (got {num_microbatches})")
        self.stages, self.state, self.schedule_name = stage_modules, state, schedule
        self.num_microbatches, self.micro_batch_size, self.seq_len = num_microbatches, micro_batch_size, seq_len
        self.loss_fn = loss_fn
        for m in stage_modules:
            m.autocast_dtype = autocast_dtype
        cfg = stage_modules[0].config
        self.tied = pp > 1 and cfg.tie_embeddings
        self._embedding_group = _embedding_group(state) if self.tied else None
        if pp == 1:
            self.schedule = None
            return

        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        hidden = tuple(activation_shape) if activation_shape is not None else (micro_batch_size, seq_len,
                                                                                cfg.hidden_size)
        device = _module_device(stage_modules[0])
        meta = torch.device("meta")

        def io_meta(m: GPTStage):
            # requires_grad marks the tensors whose gradients travel back between stages
            act = torch.empty(hidden, dtype=activation_dtype, device=meta, requires_grad=True)
            x = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device=meta) if m.embed is not None else act
            vocab = getattr(m.head, "out_features", cfg.vocab_size) if m.head is not None else None
            y = (torch.empty(micro_batch_size, seq_len, vocab, dtype=torch.float32, device=meta, requires_grad=True)
                 if m.head is not None else act)
            return x, y

        self._pipe_stages = []
        for m in stage_modules:
            x, y = io_meta(m)
            self._pipe_stages.append(PipelineStage(m, m.stage_index, m.num_stages, device, input_args=x,
                                                   output_args=y, group=state.group("pp")))
        n = num_microbatches

        def scaled_loss(logits, labels):
            return self.loss_fn(logits, labels) / n

        if schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(self._pipe_stages, n, loss_fn=scaled_loss, scale_grads=False)
        else:
            cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
            self.schedule = cls(self._pipe_stages[0], n, loss_fn=scaled_loss, scale_grads=False)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.stages[0].is_first

    @property
    def is_last(self) -> bool:
        return self.stages[-1].is_last

    def parameters(self):
        for m in self.stages:
            yield from m.parameters()

    def train(self, mode: bool = True) -> "PipelineRunner":
        for m in self.stages:
            m.train(mode)
        return self

    def eval(self) -> "PipelineRunner":
        return self.train(False)

    def _check_batch(self, tokens, labels) -> None:
        want = (self.num_microbatches * self.micro_batch_size, self.seq_len)
        for name, t, needed in (("tokens", tokens, self.is_first), ("labels", labels, self.is_last)):
            if needed and t is None:
                raise ValueError(f"pipeline rank {self.state.pp_rank} holds the "
                                 f"{'embedding' if name == 'tokens' else 'output head'} and needs {name}")
            if t is not None and needed and tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape (num_microbatches * micro_batch_size, seq_len) = "
                                 f"{want} (got {tuple(t.shape)})")

    def _broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        if self.state.pp == 1:
            return loss
        device = _module_device(self.stages[0])
        if loss is None:
            loss = torch.zeros((), dtype=torch.float32, device=device)
        loss = loss.detach().to(device=device, dtype=torch.float32).contiguous()
        dist.broadcast(loss, src=self.state.ranks["pp"][-1], group=self.state.group("pp"))
        return loss

    def _run(self, tokens, labels, backward: bool) -> torch.Tensor | None:
        """Local losses summed on the last stage (None elsewhere)."""
        n = self.num_microbatches
        if self.schedule is None:  # pp == 1: the trainer's loop
            model, total = self.stages[0], None
            for tok, lab in zip(tokens.chunk(n), labels.chunk(n)):
                loss = self.loss_fn(model(tok), lab) / n
                if backward:
                    loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
            return total
        args = (tokens,) if self.is_first else ()
        target = labels if self.is_last else None
        losses = [] if self.is_last else None
        if backward:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            self.schedule.eval(*args, target=target, losses=losses, return_outputs=False)
        if not self.is_last:
            return None
        total = torch.zeros((), dtype=torch.float32, device=losses[0].device)
        for loss in losses:
            total = total + loss.detach()
        return total

    # -- entry points ---------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor | None, labels: torch.Tensor | None, sr_step: int | None = None,
             sr_micro_base: int = 0) -> torch.Tensor:
        """Forward + backward of one global batch (``num_microbatches * micro_batch_size`` rows,
        micro-batch m = rows [m * mbs, (m + 1) * mbs)).  The first stage passes ``tokens``, the
        last ``labels``, the others may pass None.  Gradients accumulate into the chunks'
        ``.grad``; returns the mean micro-batch loss (0-dim float32) on every pipeline rank."""
        if not torch.is_grad_enabled():
            raise RuntimeError("PipelineRunner.step needs gradients enabled; use evaluate() for forward only")
        self._check_batch(tokens, labels)
        set_aux_loss_scale(1.0 / self.num_microbatches)
        for stage in self.stages:  # micro-batch m of this step quantizes at SR position (sr_step, base + m)
            stage.sr_counter = None if sr_step is None else [sr_step, sr_micro_base, 0]
        try:
            loss = self._run(tokens, labels, backward=True)
        finally:
            for stage in self.stages:
                stage.sr_counter = None
            set_sr_position(None)
        if self.tied:
            self._reduce_tied_embedding()
        return self._broadcast_loss(loss)

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        """Forward only (call ``eval()`` first for eval mode); mean micro-batch loss on every pipeline rank."""
        self._check_batch(tokens, labels)
        return self._broadcast_loss(self._run(tokens, labels, backward=False))

    def _reduce_tied_embedding(self) -> None:
        """First and last stage hold copies of a tied embedding/head weight: sum their grads."""
        w = None
        if self.is_first:
            w = self.stages[0].embed.weight
        elif self.is_last:
            w = self.stages[-1].head.weight
        if w is None:
            return
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        dist.all_reduce(w.grad, group=self._embedding_group)


def _module_device(m: nn.Module) -> torch.device:
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return torch.device("cpu")


def _embedding_group(state: ParallelState):
    """Process group {first, last pipeline rank} of this rank's pipeline (collective: every
    rank creates every such group, in the same order).  None on middle stages."""
    mine = None
    for d in range(state.dp):
        for t in range(state.tp):
            ranks = [rank_of(t, d, 0, state.tp, state.dp), rank_of(t, d, state.pp - 1, state.tp, state.dp)]
            g = dist.new_group(ranks)
            if state.rank in ranks:
                mine = g
    return mine


__all__ = ["SCHEDULES", "GPTStage", "PipelineRunner", "build_stage_modules", "lm_loss", "stage_layer_ranges",
           "unique_parameters", "virtual_stage_of"]
