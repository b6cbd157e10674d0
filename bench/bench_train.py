"""Training throughput of a config per recipe, as ratios to the bf16 recipe, in one run.

    python bench/bench_train.py [--config configs/tiny_dense.yaml] [--steps 6] [--backends emulated,fused]

Times full optimizer steps (forward, the trainer's loss, backward, clip, AdamW) of the config's model on
random tokens, in the config's dtype, for every recipe preset; the first steps (and any
torch.compile work) are excluded.  Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time

import torch

from megatron_ufp4.config import load_config
from megatron_ufp4.fp4.recipes import PRESETS, Recipe
from megatron_ufp4.model import GPTModel, LinearFactory
from megatron_ufp4.parallel.optimizer import param_groups


def make_train_step(model, cfg):
    """One optimizer step of ``model`` on fixed random tokens, as the trainer runs it in one
    process: the model's loss (chunked cross entropy), clip, fused AdamW, in the config's dtype."""
    m, t = cfg.model, cfg.training
    opt = torch.optim.AdamW(param_groups(model.parameters(), 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.dtype == "bf16")

    def step():
        with autocast:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_time(cfg, recipe: str, backend: str, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    m = cfg.model
    step = make_train_step(GPTModel(m, LinearFactory(Recipe.preset(recipe), m.num_layers, backend=backend, seed=0)),
                           cfg)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median: robust to a noisy shared machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_dense.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backends", default="emulated,fused")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. training.dtype=bf16")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    tokens = cfg.training.micro_batch_size * cfg.data.seq_len
    print(f"{args.config} ({cfg.training.dtype}), {tokens} tokens/step, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps\n")
    base = step_time(cfg, "bf16", "emulated", args.steps, args.warmup)
    print("| recipe | backend | step time | tokens/s | ratio to bf16 |\n|---|---|---|---|---|")
    print(f"| bf16 | - | {base * 1e3:.0f} ms | {tokens / base:,.0f} | 1.00x |")
    for backend in args.backends.split(","):
        for recipe in (r for r in PRESETS if r != "bf16"):
            s = step_time(cfg, recipe, backend, args.steps, args.warmup + (2 if backend == "fused" else 0))
            print(f"| {recipe} | {backend} | {s * 1e3:.0f} ms | {tokens / s:,.0f} | {s / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
