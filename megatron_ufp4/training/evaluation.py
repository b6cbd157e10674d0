"""Validation on fixed windows: per-window losses, their mean and its standard error.

The validation set is the unshuffled stream of ``seq_len``-token windows of the ``val``
split, so window ``i`` is the same tokens for every run of the same data and ``seq_len``,
whatever its recipe, seed, batch size or parallel layout.  A window's loss is the mean
next-token cross entropy over its tokens; the validation loss is the mean over windows
(every window has the same token count, so this is also the token mean).

The standard error ``sd(window losses) / sqrt(n)`` measures evaluation noise only: how much
the number would move on another draw of validation text.  It says nothing about
training-trajectory noise (seed to seed), which a study measures with several seeds.  Two
runs evaluated on the same windows are compared with the paired error of the per-window
differences (``paired_standard_error``), much smaller than either error alone.
"""
from __future__ import annotations

import math

import torch

from ..data.gpt_dataset import GPTDataset
from .run_setup import make_batch


def eval_window_count(cfg, dataset_len: int) -> int:
    """``training.eval_windows``, or when unset ``eval_iters x micro_batch_size``; at most the
    windows the validation split has."""
    t = cfg.training
    n = t.eval_windows if t.eval_windows is not None else t.eval_iters * t.micro_batch_size
    return min(n, dataset_len)


@torch.no_grad()
def window_losses(model, ds: GPTDataset, windows: int, batch_size: int, autocast) -> torch.Tensor:
    """The mean next-token loss of each of the first ``windows`` windows of ``ds``: float64 [windows]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = min(windows, len(ds))
    out = []
    for s in range(0, n, batch_size):
        tokens, labels = make_batch(ds, range(s, min(n, s + batch_size)), device)
        with autocast:
            per_token = model(tokens, labels=labels, reduction="none")
        out.append(per_token.double().mean(dim=1))  # no ignored labels in a packed window
    model.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def summarize(losses) -> dict:
    """``{"loss", "se", "windows"}`` of per-window losses (float64 arithmetic)."""
    x = torch.as_tensor(losses, dtype=torch.float64)
    n = x.numel()
    if n == 0:
        raise ValueError("no validation windows to summarize")
    se = float(x.std(correction=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"loss": float(x.mean()), "se": se, "windows": n}


def paired_standard_error(a, b) -> float:
    """Standard error of ``mean(a) - mean(b)`` for losses of the same windows (paired)."""
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    if d.numel() < 2:
        return float("nan")
    return float(d.std(correction=1) / math.sqrt(d.numel()))
