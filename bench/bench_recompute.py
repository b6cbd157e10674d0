"""Activation recomputation: activation bytes kept per layer and step time, none / selective / full.

    python bench/bench_recompute.py [--steps 6] [--configs tiny_dense tiny_moe]

For each config (its own widths, micro-batch and sequence length; ufp4 recipe, one process):

* kept bytes per layer: one transformer layer of the model runs forward on a micro-batch-sized
  input; counted are the distinct storages autograd saves outside recomputed regions
  (``torch.autograd.graph.saved_tensors_hooks``) plus the inputs the recomputed regions keep to
  run again, parameters excluded; next to it the planner's figure (tools/plan_parallel.py, with
  the CPU composite RMSNorm's extra saved product, as tests/test_planner.py checks);
* step time: the median of ``--steps`` training steps (after one warm-up step) of a Trainer
  per mode, all in this process, one after another, so the ratios compare like with like.

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from plan_parallel import layer_activation_bytes  # noqa: E402
from torch.distributed._composable import checkpoint  # noqa: E402

from megatron_ufp4.config import load_config  # noqa: E402
from megatron_ufp4.linear.step_context import StepContext  # noqa: E402
from megatron_ufp4.parallel.build import build_model  # noqa: E402
from megatron_ufp4.training.recompute import kept_activation_bytes, replay_context, transformer_layers  # noqa: E402
from megatron_ufp4.training.trainer import Trainer  # noqa: E402

MODES = {"none": ("none", "uniform"), "selective": ("selective", "uniform"), "full": ("full", "uniform")}


def layer_bytes(cfg, granularity: str) -> tuple[int, float]:
    """(measured, planned) bytes the last (MoE, in an MoE model) layer keeps for one micro-batch."""
    torch.manual_seed(0)
    model, = build_model(cfg)
    layer = transformer_layers(model)[cfg.model.num_layers - 1]
    regions = {"none": [], "selective": [layer.attn.core], "full": [layer]}[granularity]
    for module in regions:
        checkpoint(module, context_fn=replay_context(StepContext().at(0)))
    b, s, h = cfg.training.micro_batch_size, cfg.data.seq_len, cfg.model.hidden_size
    got = kept_activation_bytes(layer, torch.randn(b, s, h, requires_grad=True), regions=regions)
    n = b * s
    cpu_norm = 0 if granularity == "full" else 2 * 4 * n * h  # torch's composite RMSNorm on CPU
    return got, layer_activation_bytes(cfg.model, cfg.model.num_layers - 1, n, 4, 1, False, granularity) + cpu_norm


def step_time(cfg_path: Path, prefix: str, granularity: str, method: str, steps: int, root: Path) -> float:
    over = [f"data.prefix={prefix}", f"training.run_dir={root / granularity}", "recipe.name=ufp4",
            f"training.train_steps={steps + 1}", "training.eval_interval=0", "checkpoint.interval=0",
            f"training.recompute_granularity={granularity}", f"training.recompute_method={method}"]
    trainer = Trainer(load_config(cfg_path, over), console=lambda *a, **k: None)
    try:
        trainer.train_step()  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
    finally:
        trainer.close()
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", nargs="+", default=["tiny_dense", "tiny_moe"])
    ap.add_argument("--data-prefix", default=str(REPO / "data" / "shakespeare" / "shakespeare"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| config | recompute | kept bytes / layer (measured) | planner | vs none | step time (s) | vs none |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            path = REPO / "configs" / f"{name}.yaml"
            cfg = load_config(path, [f"data.prefix={args.data_prefix}", "recipe.name=ufp4"])
            rows = {}
            for mode, (granularity, method) in MODES.items():
                got, want = layer_bytes(cfg, granularity)
                rows[mode] = (got, want, step_time(path, args.data_prefix, granularity, method, args.steps,
                                                   Path(tmp) / name))
            base_bytes, base_time = rows["none"][0], rows["none"][2]
            for mode, (got, want, t) in rows.items():
                print(f"| {name} | {mode} | {got:,} | {want:,.0f} | {got / base_bytes:.3f} | {t:.3f} | "
                      f"{t / base_time:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
