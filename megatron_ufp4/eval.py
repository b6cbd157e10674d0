"""Validation loss of a checkpoint on fixed windows, with its standard error.

    python -m megatron_ufp4.eval runs/tiny_dense [--windows 256] [--backend fused] [--json out.json [--overwrite]]

The windows are the first ``--windows`` ``seq_len``-token windows of the validation split,
in stream order, so every checkpoint of the same data and ``seq_len`` is scored on the same
text.  ``--json`` writes the per-window losses too (a study pairs them across runs).
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ufp4-eval", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint directory (step_*) or run directory (latest checkpoint)")
    ap.add_argument("--windows", type=int, default=None,
                    help="validation windows (default: the run's training.eval_windows, else eval_iters x "
                         "micro_batch_size)")
    ap.add_argument("--iters", type=int, default=None, help="validation micro-batches (--windows = iters x batch)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: micro_batch_size)")
    ap.add_argument("--data-prefix", default=None, help="a dataset made by our prepare, in place of the run's data "
                    "(default: the run's data.prefix or data.path)")
    ap.add_argument("--split", choices=("valid", "test"), default="valid",
                    help="the run's validation set, or its test set (data.path runs: data.split's test share or "
                         "data.test_path)")
    ap.add_argument("--backend", default=None, help="FP4 GEMM backend to evaluate with (default: the run's)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the usable cores)")
    ap.add_argument("--json", default=None, help="write the result and the per-window losses to this new file")
    ap.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    args = ap.parse_args(argv)
    for name in ("windows", "iters", "batch_size"):  # checked before any checkpoint is read
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1 (got {v})", file=sys.stderr)
            return 2
    if args.threads < 0:
        print(f"error: --threads must be >= 0 (got {args.threads})", file=sys.stderr)
        return 2

    import torch

    from .config import ConfigError
    from .outputs import OutputError, check_output, write_text
    from .training.checkpoint import CheckpointError
    from .training.evaluation import eval_window_count, summarize, window_losses
    from .training.inference import load_trained_model, resolve_checkpoint
    from .training.run_info import check_same_tokenizer, precision_label
    from .training.run_setup import check_backend_device, configure_threads, select_device, validation_dataset

    try:
        configure_threads(args.threads)
        device = select_device(args.device, field="--device")
        if args.backend is not None:
            check_backend_device(args.backend, device)
        ckpt = resolve_checkpoint(args.checkpoint)
        if args.json:  # before any work: never the checkpoint read, never an existing file unless asked
            check_output(args.json, overwrite=args.overwrite, inputs=[ckpt], units=[ckpt], what="--json")
        model, cfg, step = load_trained_model(ckpt, device, backend=args.backend)
        check_backend_device(args.backend or cfg.gemm.backend, device)  # the run's own backend, e.g. fused
        if args.data_prefix:  # a prepared dataset, in place of the run's data (prefix or data.path)
            cfg.data.prefix, cfg.data.path, cfg.data.tokenizer = args.data_prefix, None, None
            cfg.data.split = cfg.data.valid_path = cfg.data.test_path = None
        if ckpt.is_dir() and ckpt.parent.name == "checkpoints":  # a run's checkpoint: the run's tokenizer
            check_same_tokenizer(ckpt.parent.parent, cfg, "--data-prefix" if args.data_prefix else "data.prefix")
        batch = args.batch_size or cfg.training.micro_batch_size
        ds = validation_dataset(cfg, args.split)
        if args.windows is not None or args.iters is not None:
            windows = args.windows if args.windows is not None else args.iters * batch
            if windows > len(ds):  # a study asks the same count of every run: capped, and said
                flag = f"--windows {args.windows}" if args.windows is not None else f"--iters {args.iters}"
                print(f"warning: {flag} asks for {windows} windows; the {args.split} set of {cfg.data.describe()} has "
                      f"{len(ds)} of {cfg.data.seq_len} tokens: scoring its {len(ds)}", file=sys.stderr)
                windows = len(ds)
        else:
            windows = eval_window_count(cfg, len(ds))
        if windows < 1:
            raise ValueError(f"the run evaluates no windows (training.eval_iters={cfg.training.eval_iters}); "
                             "pass --windows N (N >= 1)")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.training.dtype == "bf16")
        losses = window_losses(model, ds, windows, batch, autocast)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:  # OutputError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = summarize(losses)
    recipe, backend = cfg.build_recipe()
    se = f" ± {res['se']:.4f}" if math.isfinite(res["se"]) else ""
    which = "validation" if args.split == "valid" else "test"
    print(f"step {step}: {which} loss {res['loss']:.4f}{se}, perplexity {math.exp(min(res['loss'], 50)):.2f} "
          f"({res['windows']} windows of {cfg.data.seq_len} tokens; {precision_label(recipe, cfg.training.dtype)} "
          f"on {backend})")
    if args.json:
        out = {"checkpoint": str(ckpt), "step": step, **res, "seq_len": cfg.data.seq_len, "data": cfg.data.describe(),
               "split": args.split, "backend": backend, "label": precision_label(recipe, cfg.training.dtype),
               "window_losses": losses.tolist()}
        try:
            check_output(args.json, overwrite=args.overwrite, what="--json")  # still free after the evaluation
            write_text(args.json, json.dumps(out) + "\n")
        except (OSError, OutputError) as e:
            print(f"error: --json {args.json}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
