"""Record the exact per-step loss and gradient norm of fixed short runs, and compare two recordings.

    python tools/record_runs.py record before.json                  # this checkout
    python tools/record_runs.py record before.json --at 00cd5f5     # another commit (a temporary worktree)
    python tools/record_runs.py record after.json --only tiny_dense_ufp4 tp2_pp2_ufp4
    python tools/record_runs.py compare before.json after.json      # exit 1 on any difference
    python tools/record_runs.py record old.json --at 00cd5f5 --keep old_runs
    python tools/record_runs.py record resumed.json --resume-from old_runs  # resume their mid-run checkpoints

A refactoring that must not change what any run computes is proven on the same machine, at
the same CPU dispatch level: record at the starting commit, change the code, record again,
compare bit for bit (values as ``float.hex``).  Float results differ between CPUs, so a
recording is only compared with one made on the same machine.

The runs: tiny models on the Shakespeare sample (prepared once into a temporary directory),
``--steps`` optimizer steps each (default 4), one process each for tiny_dense ufp4 / nvfp4,
tiny_moe ufp4 and e2m1_ref under bf16 autocast, and under torchrun (gloo, CPU): TP2 x PP2
ufp4, EP2 MoE ufp4, TP2 + sequence parallel nvfp4 and DP2 (ZeRO-1 AdamW).  ``--keep DIR``
keeps the run directories (their checkpoints at step ``--steps // 2`` and the final one, for
a resume check).  ``--resume-from DIR`` continues each kept run from its checkpoint at step
``--steps // 2`` with this checkout (``training.resume=auto``): the recording then holds the
first half as the kept run logged it and the second half as the resumed run computed it, so
comparing it with a straight recording proves that checkpoints of another version resume
bit-identically.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=128",
         "model.num_layers=2", "model.vocab_size=512", "model.max_seq_len=64"]
MOE = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=64"]
RUN = ["data.seq_len=64", "training.micro_batch_size=4", "training.global_batch_size=8", "training.eval_interval=0",
       "logging.interval=1", "schedule.warmup_steps=1", "optimizer.lr=3e-3", "training.seed=7"]
# name -> (config, processes, overrides)
RUNS = {
    "tiny_dense_ufp4": ("tiny_dense", 1, ["recipe.name=ufp4"]),
    "tiny_dense_nvfp4": ("tiny_dense", 1, ["recipe.name=nvfp4"]),
    "tiny_moe_ufp4": ("tiny_moe", 1, [*MOE, "recipe.name=ufp4"]),
    "tiny_dense_e2m1_ref_bf16": ("tiny_dense", 1, ["recipe.name=e2m1_ref", "training.dtype=bf16"]),
    "tp2_pp2_ufp4": ("tiny_dense", 4, ["recipe.name=ufp4", "parallel.tensor=2", "parallel.pipeline=2"]),
    "ep2_moe_ufp4": ("tiny_moe", 2, [*MOE, "recipe.name=ufp4", "parallel.expert=2"]),
    "tp2_sp_nvfp4": ("tiny_dense", 2, ["recipe.name=nvfp4", "parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "dp2_zero1": ("tiny_dense", 2, ["recipe.name=ufp4", "parallel.data=2"]),
}


def _prepare(code: Path, work: Path, env: dict) -> str:
    prefix = work / "data" / "shk"
    subprocess.run([sys.executable, "-m", "megatron_ufp4.data.prepare", "--input",
                    str(REPO / "tests" / "data" / "shakespeare_sample.txt"), "--output", str(prefix), "--vocab-size",
                    "512", "--split-paragraphs", "--val-fraction", "0.1", "--seed", "0"],
                   cwd=code, env=env, check=True, capture_output=True)
    return str(prefix)


def _run(code: Path, work: Path, env: dict, name: str, prefix: str, steps: int,
         resume_from: Path | None = None) -> dict:
    config, procs, extra = RUNS[name]
    run_dir = work / "runs" / name
    args = [str(code / "configs" / f"{config}.yaml"), *MODEL, *RUN, *extra, f"data.prefix={prefix}",
            f"training.run_dir={run_dir}", f"training.train_steps={steps}",
            f"checkpoint.interval={max(1, steps // 2)}", "checkpoint.keep_last=4"]
    if resume_from is not None:  # the kept run, cut back to its mid-run checkpoint
        shutil.copytree(resume_from / name, run_dir)
        for ckpt in (run_dir / "checkpoints").iterdir():
            if int(ckpt.name.split("_")[1]) > steps // 2:
                shutil.rmtree(ckpt)
        args.append("training.resume=auto")
    head = [sys.executable, "-m"] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc-per-node={procs}", "-m"]
    proc = subprocess.run([*head, "megatron_ufp4.train", *args], cwd=code, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()][:3]  # the ranks' own lines
        raise RuntimeError(f"{name}: exit {proc.returncode}: {errors or proc.stderr.strip().splitlines()[-1:]}")
    if resume_from is not None and f"at step {steps // 2}" not in proc.stdout:  # a restart would match too
        raise RuntimeError(f"{name}: did not resume from its step {steps // 2} checkpoint")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_rec = [r for r in recs if "loss" in r and "step" in r]
    return {"steps": [{"step": r["step"], "loss": float(r["loss"]).hex(), "grad_norm": float(r["grad_norm"]).hex()}
                      for r in steps_rec]}


def record(out: Path, at: str | None, only: list[str], steps: int, keep: Path | None,
           resume_from: Path | None = None) -> int:
    names = only or list(RUNS)
    bad = [n for n in names if n not in RUNS]
    if bad:
        print(f"error: unknown run {bad[0]!r} (known: {', '.join(RUNS)})", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="record_runs_"))
    code = REPO
    try:
        if at:
            code = work / "checkout"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(code), at], check=True,
                           capture_output=True)
        commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        if subprocess.run(["git", "-C", str(code), "diff", "--quiet", "HEAD"]).returncode:
            commit += " + uncommitted changes"
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        prefix = _prepare(code, work, env)
        result = {"commit": commit, "steps": steps, "runs": {}}
        for name in names:
            result["runs"][name] = _run(code, work, env, name, prefix, steps, resume_from)
            print(f"{name}: {len(result['runs'][name]['steps'])} steps", flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out} (commit {commit})")
        if keep:
            shutil.copytree(work / "runs", keep, dirs_exist_ok=False)
        return 0
    finally:
        if at:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(code)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def compare(a: Path, b: Path) -> int:
    ra, rb = json.loads(a.read_text())["runs"], json.loads(b.read_text())["runs"]
    diffs = []
    for name in sorted(set(ra) | set(rb)):
        if ra.get(name) != rb.get(name):
            sa, sb = (ra.get(name) or {}).get("steps", []), (rb.get(name) or {}).get("steps", [])
            first = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
            diffs.append(f"{name}: differs from step {first + 1} ({len(sa)} vs {len(sb)} steps)")
    for line in diffs or ["every run bit-identical"]:
        print(line)
    return 1 if diffs else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run the fixed runs, write their per-step values")
    r.add_argument("out", type=Path)
    r.add_argument("--at", default=None, help="a commit to record instead of this checkout")
    r.add_argument("--only", nargs="+", default=[], help=f"some of: {', '.join(RUNS)}")
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--keep", type=Path, default=None, help="copy the run directories here")
    r.add_argument("--resume-from", type=Path, default=None,
                   help="continue the runs kept (--keep) by another recording from their mid-run checkpoint")
    c = sub.add_parser("compare", help="two recordings, bit for bit")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "compare":
        return compare(args.a, args.b)
    if args.steps < 2:
        print("error: --steps must be >= 2", file=sys.stderr)
        return 2
    if args.out.exists() or (args.keep and args.keep.exists()):
        print(f"error: {args.out if args.out.exists() else args.keep} already exists", file=sys.stderr)
        return 2
    try:
        return record(args.out, args.at, args.only, args.steps, args.keep, args.resume_from)
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
