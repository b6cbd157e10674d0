"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, kind: str, warmup_steps: int,
          min_lr_ratio: float, decay_fraction: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    min_lr = base_lr * min_lr_ratio
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    if kind == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    if kind == "wsd":  # hold the peak, then decay linearly over the last decay_fraction of steps
        decay_steps = max(1, round(total_steps * decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return base_lr
        return base_lr - (base_lr - min_lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    raise ValueError(f"unknown schedule kind {kind!r}")
