"""Validation loss and perplexity of a checkpoint.

    python -m megatron_ufp4.eval runs/tiny_dense [--iters 20] [--data-prefix data/shakespeare] [--device cuda]
"""
from __future__ import annotations

import argparse
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ufp4-eval", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint directory (step_*) or run directory (latest checkpoint)")
    ap.add_argument("--iters", type=int, default=None, help="validation micro-batches (default: training.eval_iters)")
    ap.add_argument("--data-prefix", default=None, help="prepared dataset prefix (default: the run's data.prefix)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    args = ap.parse_args(argv)
    if args.iters is not None and args.iters < 1:  # checked before any checkpoint is read
        print(f"error: --iters must be >= 1 (got {args.iters})", file=sys.stderr)
        return 2

    import torch

    from .config import ConfigError
    from .training.checkpoint import CheckpointError
    from .training.inference import load_trained_model
    from .training.run_setup import resolve_device
    from .training.trainer import evaluate_loss, validation_dataset

    try:
        device = resolve_device(args.device, field="--device")
        model, cfg, step = load_trained_model(args.checkpoint, device)
        if args.data_prefix:
            cfg.data.prefix = args.data_prefix
        if args.iters is not None:
            cfg.training.eval_iters = args.iters
        if cfg.training.eval_iters < 1:
            raise ValueError(f"the run has training.eval_iters={cfg.training.eval_iters}; pass --iters N (N >= 1)")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.training.dtype == "bf16")
        loss = evaluate_loss(model, validation_dataset(cfg), cfg.training.micro_batch_size,
                             cfg.training.eval_iters, autocast)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"step {step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f} "
          f"({cfg.training.eval_iters} x {cfg.training.micro_batch_size} samples of {cfg.data.seq_len} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
