"""Several trainings at once on one machine: threads per process = all cores vs a share of them.

    python bench/bench_threads.py [--procs 2] [--steps 30] [--recipe ufp4]

Starts ``--procs`` concurrent ``megatron_ufp4.train`` runs of the study model
(configs/studies/recipes.yaml's shape) twice: each with as many threads as the machine has
cores (what torch picks by default), then each with cores / procs threads (what the study
runner and ``training.cpu_threads: 0`` under torchrun pick).  Prints the median step time
of every run (from metrics.jsonl, warm-up steps left out) as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = ["model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=384",
         "model.num_layers=4", "training.micro_batch_size=4", "training.global_batch_size=4",
         "training.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false", "logging.interval=10"]


def run_group(procs: int, threads: int, steps: int, recipe: str, root: Path, warmup: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs = []
    for i in range(procs):
        d = root / f"t{threads}_{i}"
        cmd = [sys.executable, "-m", "megatron_ufp4.train", "configs/tiny_dense.yaml", *SHAPE,
               f"recipe.name={recipe}", f"training.train_steps={steps}", f"training.run_dir={d}", f"training.seed={i}"]
        runs.append((d, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    out = []
    for d, p in runs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"a training failed: {err.decode()[-400:]}")
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        out.append(statistics.median(r["step_time_s"] for r in recs[warmup:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--recipe", default="ufp4")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, cores // args.procs)
    print(f"{args.procs} concurrent {args.recipe} trainings, {cores} cores, median step of steps "
          f"{args.warmup + 1}..{args.steps}\n")
    print("| threads per process | median step per process | mean |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for threads in dict.fromkeys((cores, share)):
            t = run_group(args.procs, threads, args.steps, args.recipe, Path(tmp), args.warmup)
            results[threads] = statistics.mean(t)
            print(f"| {threads} | {', '.join(f'{x * 1e3:.0f} ms' for x in t)} | {results[threads] * 1e3:.0f} ms |",
                  flush=True)
    if len(results) == 2:
        print(f"\n{cores} threads each / {share} thread(s) each: {results[cores] / results[share]:.2f}x")


if __name__ == "__main__":
    main()
