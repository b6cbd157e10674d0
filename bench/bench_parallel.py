"""Training throughput per parallel layout on this machine (gloo), as ratios to one rank.

    python bench/bench_parallel.py [--steps 6] [--data-prefix data/shakespeare/shakespeare]

Launches ``torchrun`` for tiny_dense and tiny_moe at 1, 2 and 4 ranks along each parallel
dimension, reads tokens/s from each run's metrics.jsonl (median of the steps after the
first two), and prints it next to the communication volume per rank and step that
``tools/plan_parallel.py`` computes from the model shape.  On a 2-core CPU, 4 ranks
oversubscribe the cores: the ratios show overheads, not speedups.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from plan_parallel import plan  # noqa: E402

from megatron_ufp4.config import load_config  # noqa: E402

LAYOUTS = {
    "configs/tiny_dense.yaml": [{}, {"parallel.tensor": 2}, {"parallel.pipeline": 2}, {"parallel.data": 2},
                                {"parallel.tensor": 4}, {"parallel.pipeline": 4}, {"parallel.data": 4},
                                {"parallel.tensor": 2, "parallel.pipeline": 2}],
    "configs/tiny_moe.yaml": [{}, {"parallel.data": 2, "parallel.expert": 2},
                              {"parallel.data": 4, "parallel.expert": 4}, {"parallel.tensor": 2},
                              {"parallel.data": 2, "parallel.expert": 2, "parallel.tensor": 2}],
}


def run(config: str, layout: dict, steps: int, prefix: str, base: dict, run_dir: Path) -> float:
    world = 1
    for k in ("parallel.tensor", "parallel.pipeline", "parallel.data"):
        world *= layout.get(k, 1)
    over = {**base, **layout, "data.prefix": prefix, "training.run_dir": str(run_dir),
            "training.train_steps": steps}
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-port=29533",
            "-m", "megatron_ufp4.train", config] + [f"{k}={v}" for k, v in over.items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // world))}
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in recs[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--data-prefix", default="data/shakespeare/shakespeare")
    ap.add_argument("--recipe", default="ufp4")
    args = ap.parse_args()
    base = {"recipe.name": args.recipe, "training.micro_batch_size": 4, "training.global_batch_size": 16,
            "data.seq_len": 128, "training.eval_interval": 0, "checkpoint.interval": 0,
            "checkpoint.save_final": "false", "logging.interval": 1}
    print(f"recipe {args.recipe}, global batch 16 x 128 tokens, micro-batch 4, gloo on "
          f"{os.cpu_count()} CPU cores\n")
    print("| config | layout | ranks | tokens/s | ratio to 1 rank | TP / PP / DP / EP MiB per rank per step |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for config, layouts in LAYOUTS.items():
            single = None
            for i, layout in enumerate(layouts):
                tps = run(config, layout, args.steps, args.data_prefix, base, Path(tmp) / f"{Path(config).stem}{i}")
                single = single or tps
                cfg = load_config(config, [f"{k}={v}" for k, v in {**base, **layout}.items()])
                world = cfg.parallel.tensor * cfg.parallel.pipeline * max(1, cfg.parallel.data)
                vol = plan(cfg, world)["comm_bytes_per_step"]
                name = ", ".join(f"{k.split('.')[1]} {v}" for k, v in layout.items()) or "single"
                mib = " / ".join(f"{vol[d] / 2**20:.1f}" for d in ("tensor", "pipeline", "data", "expert"))
                print(f"| {Path(config).stem} | {name} | {world} | {tps:,.0f} | {tps / single:.2f}x | {mib} |",
                      flush=True)


if __name__ == "__main__":
    main()
