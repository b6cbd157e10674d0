"""Where in training a model's next forward is, passed explicitly instead of held globally.

One ``StepContext`` per model: its ``LinearFactory`` hands the same object to every layer
it builds, and the training loop (or a pipeline stage) sets it before each micro-batch's
forward.  Layers read it *in forward* and keep what they read on the autograd context,
so a backward that runs after later micro-batches' forwards (pipeline schedules) still
uses its own micro-batch's values, and two models in one process never interfere.

``phase`` is the precision-schedule phase (fp4/schedule.py) whose GEMM plan the layers run.
The loop sets it at step boundaries only, when no backward is pending, so every forward
and backward of one step sees the same phase; ``at`` leaves it alone.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepContext:
    step: int | None = None  # None: outside training (SR keys then come from each layer's generator)
    micro_batch: int = 0  # counted over the whole global batch, across data-parallel ranks
    aux_loss_scale: float = 1.0  # weight of auxiliary (MoE) losses in backward, e.g. 1 / micro-batches
    phase: int = 0  # precision-schedule phase of the current step (0: the base recipe)
    # True while activation recomputation re-runs a forward in backward: the layers compute exactly
    # what they computed the first time, but repeat no side effect (telemetry, MoE load counts)
    recomputing: bool = False

    def at(self, step: int | None, micro_batch: int = 0) -> "StepContext":
        """Set the position of the next forward (``None``: leave training)."""
        self.step = None if step is None else int(step)
        self.micro_batch = int(micro_batch)
        return self

    @property
    def position(self) -> tuple[int, int] | None:
        """(step, micro-batch) the next forward's GEMMs belong to, or None outside training."""
        return None if self.step is None else (self.step, self.micro_batch)
