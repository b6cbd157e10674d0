"""Pipeline parallelism, part two: running a global batch through the stages with
``torch.distributed.pipelining`` (1F1B, interleaved 1F1B, GPipe; gloo as well as NCCL).

    runner = PipelineRunner(chunks, state, schedule="1f1b", num_microbatches=8,
                            micro_batch_size=4, seq_len=2048)
    loss = runner.step(tokens if state.is_first_stage else None,
                       labels if state.is_last_stage else None, sr_step=step)

Three choices make it reproduce one process:

* Static stage metadata.  Every ``PipelineStage`` gets ``input_args`` / ``output_args`` (meta
  tensors of the micro-batch shapes), so the library skips its *dynamic* shape inference,
  which runs an extra real forward and backward of each stage (adding to the MoE load
  counters, possibly feeding uninitialised buffers through routers).  Static shapes are why
  the runner needs ``micro_batch_size`` and ``seq_len`` up front.
* Loss scaling in the loss, not in the gradients.  The schedules get ``scale_grads=False``
  and a loss function that returns ``loss_fn(logits, labels) / num_microbatches``; MoE aux
  losses get ``step_context.aux_loss_scale = 1 / num_microbatches``.  That is exactly what
  the single-process ``Trainer`` does (the library's default instead divides the
  accumulated gradients afterwards, which rounds differently).
* SR position per micro-batch.  Each chunk runs wrapped in a module that sets the model's
  ``StepContext`` to (step, first micro-batch of this rank + m) before the chunk's m-th
  forward of the step; layers keep that position for their backward, so SR keys (in any
  GEMM, forward or backward) do not depend on the schedule's order of forwards and
  backwards.

So each module sees the same operations on the same values as in one process, and PP
results match one process bit for bit (tests: fp32 bf16-recipe and ufp4,
dense and MoE, all three schedules).  The one place where the sum order necessarily
changes is an embedding both ends hold (``tie_embeddings``, or MTP's token embedding on
the last stage): the first and last stage each hold a copy, and their gradient
contributions are added by an all-reduce after the schedule instead of inside autograd
(agreement ~1e-9 rather than bitwise).

Gradient bookkeeping left to the training loop: gradients *accumulate* into ``.grad`` (zero
them after the optimizer step, as one process does); data-parallel reduction
is not done here; for gradient clipping the squared norm must be summed over the pipeline
group, counting the last stage's embedding copy out (``unique_parameters``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..model.gpt import GPTModel
from ..model.losses import lm_loss
from .pipeline import virtual_stage_of
from .state import ParallelState, rank_of

SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")


class _ScheduledChunk(nn.Module):
    """What the schedule runs for one chunk: sets the SR position of each forward, autocast.

    ``stop_before_head``: the chunk returns its last layer's output and the loss function runs
    final norm, head and cross entropy together (``head_loss``, chunked over tokens; with MTP
    the MTP modules too, which need the last layer's output, not the final norm's).
    """

    def __init__(self, chunk: GPTModel, autocast_dtype: torch.dtype | None, stop_before_head: bool = False):
        super().__init__()
        self.chunk, self.autocast_dtype, self.stop_before_head = chunk, autocast_dtype, stop_before_head
        self.counter: list[int] | None = None  # [step, first micro-batch, forwards so far]

    def autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=self.autocast_dtype) if self.autocast_dtype is not None \
            else nullcontext()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        if self.counter is not None:
            step, base, n = self.counter
            self.chunk.step_context.at(step, base + n)
            self.counter[2] += 1
        with self.autocast(x.device.type):
            if labels is not None:  # reduction "none": per-token losses (window_losses with pipeline size 1)
                return self.chunk(x, labels=labels, reduction=reduction)
            return self.chunk.layer_states(x) if self.stop_before_head else self.chunk(x)

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        with self.autocast(hidden.device.type):
            return self.chunk.loss_from_layer_states(hidden, labels, reduction)


class PipelineRunner:
    """Runs forward + backward of one global batch over the pipeline group.

    ``stage_modules``: this rank's chunks from ``build_stage_modules`` (one, or ``vpp`` for
    ``schedule="interleaved_1f1b"``).  A micro-batch's mean loss is the last chunk's
    ``head_loss`` (head + cross entropy chunked over tokens: the full FP32 logits never
    exist, as in one process's ``model(tokens, labels=labels)``), or with
    ``loss_fn(logits, labels)`` that function of the full logits.  The runner divides it by
    ``num_microbatches`` (and sets the MoE aux-loss scale to ``1 / num_microbatches``) so
    gradients equal one process's.
    ``micro_batch_size`` / ``seq_len`` fix the activation shapes sent between stages
    (``activation_shape`` overrides the (micro_batch_size, seq_len, hidden) default, e.g.
    for sequence-parallel shards).  ``autocast_dtype`` runs the stage forwards under autocast.

    All ranks of the world must construct their runners together (a tied embedding creates
    process groups).  With pipeline size 1 no communication happens: ``step`` runs the
    micro-batches one after another like one process.
    """

    def __init__(self, stage_modules: Sequence[GPTModel], state: ParallelState, *, schedule: str = "1f1b",
                 num_microbatches: int, micro_batch_size: int, seq_len: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
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
        self._per_row_losses = False
        self._scheduled = [_ScheduledChunk(m, autocast_dtype, stop_before_head=loss_fn is None and m.head is not None)
                           for m in stage_modules]
        cfg = stage_modules[0].config
        # first and last stage both hold the embedding: tied to the head, or for MTP's token embedding
        self.tied = pp > 1 and (cfg.tie_embeddings or cfg.mtp_depth > 0)
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

        def io_meta(m: GPTModel):
            # requires_grad marks the tensors whose gradients travel back between stages
            act = torch.empty(hidden, dtype=activation_dtype, device=meta, requires_grad=True)
            x = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device=meta) if m.stage_index == 0 else act
            if m.head is None or loss_fn is None:  # hidden states (to the next stage, or to head_loss)
                return x, act
            vocab = getattr(m.head, "out_features", cfg.vocab_size)
            return x, torch.empty(micro_batch_size, seq_len, vocab, dtype=torch.float32, device=meta,
                                  requires_grad=True)

        self._pipe_stages = []
        for m, wrapped in zip(stage_modules, self._scheduled):
            x, y = io_meta(m)
            self._pipe_stages.append(PipelineStage(wrapped, m.stage_index, m.num_stages, device, input_args=x,
                                                   output_args=y, group=state.group("pp")))
        n = num_microbatches

        def scaled_loss(output, labels):
            if self._per_row_losses:  # window_losses: forward only, each row's mean token loss
                return self._scheduled[-1].head_loss(output, labels, reduction="none").double().mean(dim=1)
            if self.loss_fn is None:  # the last chunk's output is its head's input
                return self._scheduled[-1].head_loss(output, labels) / n
            return self.loss_fn(output, labels) / n

        if schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(self._pipe_stages, n, loss_fn=scaled_loss, scale_grads=False)
        else:
            cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
            self.schedule = cls(self._pipe_stages[0], n, loss_fn=scaled_loss, scale_grads=False)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.stages[0].stage_index == 0

    @property
    def is_last(self) -> bool:
        last = self.stages[-1]
        return last.stage_index == last.num_stages - 1

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
            model, total = self._scheduled[0], None
            for tok, lab in zip(tokens.chunk(n), labels.chunk(n)):
                loss = (model(tok, labels=lab) if self.loss_fn is None else self.loss_fn(model(tok), lab)) / n
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
        for wrapped in self._scheduled:  # micro-batch m of this step quantizes at SR position (sr_step, base + m)
            wrapped.chunk.step_context.aux_loss_scale = 1.0 / self.num_microbatches
            wrapped.counter = None if sr_step is None else [sr_step, sr_micro_base, 0]
        try:
            loss = self._run(tokens, labels, backward=True)
        finally:
            for wrapped in self._scheduled:
                wrapped.counter = None
                wrapped.chunk.step_context.at(None)
        if self.tied:
            self._reduce_tied_embedding()
        return self._broadcast_loss(loss)

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        """Forward only (call ``eval()`` first for eval mode); mean micro-batch loss on every pipeline rank."""
        self._check_batch(tokens, labels)
        return self._broadcast_loss(self._run(tokens, labels, backward=False))

    @torch.no_grad()
    def window_losses(self, tokens: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        """Forward only (call ``eval()`` first): each row's mean next-token loss, float64
        [rows], on every pipeline rank.  With pipeline size 1 any number of rows (micro-batches
        of ``micro_batch_size``, the last one short); else exactly one global batch."""
        if self.schedule is None:
            model, out = self._scheduled[0], []
            for tok, lab in zip(tokens.split(self.micro_batch_size), labels.split(self.micro_batch_size)):
                out.append(model(tok, labels=lab, reduction="none").double().mean(dim=1))
            return torch.cat(out)  # no ignored labels in a packed window: the token mean
        self._check_batch(tokens, labels)
        rows = self.num_microbatches * self.micro_batch_size
        device = _module_device(self.stages[0])
        if self.is_last:
            losses = []

            self._per_row_losses = True  # the schedule's loss function returns each row's loss
            try:
                self.schedule.eval(*((tokens,) if self.is_first else ()), target=labels, losses=losses,
                                   return_outputs=False)
            finally:
                self._per_row_losses = False
            out = torch.cat([x.reshape(-1) for x in losses]).to(device)
        else:
            self.schedule.eval(*((tokens,) if self.is_first else ()), return_outputs=False)
            out = torch.zeros(rows, dtype=torch.float64, device=device)
        dist.broadcast(out, src=self.state.ranks["pp"][-1], group=self.state.group("pp"))
        return out

    def _reduce_tied_embedding(self) -> None:
        """First and last stage hold copies of the embedding (tied head weight, or MTP's
        embedding; both at once are one tensor): sum their grads."""
        w = None
        if self.is_first:
            w = self.stages[0].embed.weight
        elif self.is_last:
            last = self.stages[-1]
            w = last.embed.weight if last.embed is not None else last.head.weight
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


__all__ = ["SCHEDULES", "PipelineRunner", "lm_loss"]
