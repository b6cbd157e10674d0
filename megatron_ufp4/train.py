"""Pretrain a model: ``python -m megatron_ufp4.train CONFIG.yaml [section.key=value ...]``.

Examples:
    python -m megatron_ufp4.train configs/tiny_dense.yaml
    python -m megatron_ufp4.train configs/tiny_dense.yaml recipe.name=e2m1_ref training.run_dir=runs/e2m1
    python -m megatron_ufp4.train configs/tiny_moe.yaml optimizer.lr=3e-4 training.dtype=bf16
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    rc = 1
    try:
        rc = _main(argv)
        return rc
    finally:
        _shutdown_distributed(all_done=rc == 0)


def _shutdown_distributed(all_done: bool = False) -> None:
    """Tear the process group down in order: left to interpreter exit, its threads can be
    destroyed while running ("terminate called without an active exception", SIGABRT).
    ``all_done`` (this rank finished cleanly, so every rank did): wait for the others first, so
    that no rank dismantles its end of the group while a slower one still writes its last
    checkpoint or metrics through it (a rank once aborted that way at exit)."""
    if "torch.distributed" not in sys.modules:
        return
    import gc

    import torch.distributed as dist
    # the run's objects are freed now, while the interpreter and the groups are alive: reference
    # cycles (gradient hooks, closures) would keep collective handles and tensors to interpreter
    # finalisation, where freeing them from Gloo's worker threads can abort the process
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if all_done:
            try:
                dist.barrier()
            except Exception:  # a peer already gone: tear down anyway
                pass
        dist.destroy_process_group()


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ufp4-train", description="Pretrain with FP4 GEMMs.",
                                 epilog="Overrides: section.key=value, e.g. recipe.name=nvfp4 optimizer.lr=3e-4")
    ap.add_argument("config", help="YAML config file (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, section.key=value")
    ap.add_argument("--exit-after", type=int, default=None, help="stop (with a checkpoint) after this step")
    args = ap.parse_args(argv)

    from .config import ConfigError, dump_config, load_config
    from .training.checkpoint import CheckpointError
    from .linear import precision_table
    from .training.errors import print_error
    from .outputs import os_error_line
    from .training.loop import Preempted
    from .training.trainer import Trainer, TrainingAborted

    try:
        cfg = load_config(args.config, args.overrides)
        from .training.run_setup import configure_threads
        configure_threads(cfg.training.cpu_threads)  # before any tensor work
        if int(os.environ.get("RANK", "0")) == 0:
            print("resolved config:\n" + dump_config(cfg))
        trainer = Trainer(cfg)
        trainer.console(trainer.recipe.table())
        if trainer.precision_schedule.scheduled:
            trainer.console(trainer.precision_schedule.table(cfg.training.train_steps))
        trainer.console("\n".join(precision_table(s) for s in trainer.stages))
        result = trainer.train(exit_after=args.exit_after)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, TrainingAborted) as e:
        print_error(f"error: {e}")  # under torchrun: one line per job, not one per rank
        return 2 if not isinstance(e, TrainingAborted) else 1
    except OSError as e:  # e.g. a full disk while appending to metrics.jsonl
        print_error(f"error: {os_error_line(e, 'training.run_dir')}")
        return 2
    except Preempted as e:  # a checkpoint was saved: exit as the signal would, so schedulers requeue
        print_error(str(e), rank0=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        print_error("interrupted", rank0=True)
        return 130
    except RuntimeError as e:
        from .training.trainer import CollectiveFailure
        if not isinstance(e, CollectiveFailure):
            raise
        print_error(f"error: {e}")
        sys.stdout.flush()
        os._exit(1)  # a hung peer can block the process-group teardown at interpreter exit
    if "val_loss" in result and int(os.environ.get("RANK", "0")) == 0:
        print(f"final validation loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.2f}) "
              f"at step {result['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
