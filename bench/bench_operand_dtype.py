"""The loss effect of bf16 GEMM operands: ``gemm.backend`` = emulated vs triton vs triton_bf16.

    python bench/bench_operand_dtype.py [--data PREFIX] [--recipes ufp4,nvfp4,mxfp4] [--steps 40]
        [--config configs/tiny_dense.yaml] [key=value ...]

For each recipe, trains the same model from the same seed on the same data for ``--steps`` steps
once per backend, sequentially in this process (one intra-op thread), and prints a markdown table:
per backend the final train loss, max over steps of |loss - emulated loss|, whether the per-step
losses are bitwise identical to emulated's, and the final validation loss (when the run has one).

* ``emulated``: eager torch reference (fake-quantized operands, fp32 GEMM, TF32 off).
* ``triton``: Triton kernels produce the same dequantized operands in fp32, then an fp32 GEMM:
  expected bitwise equal to emulated (the table reports what was observed).
* ``triton_bf16``: the same kernels, operands rounded once to bf16, bf16 GEMM with fp32
  accumulation.  MXFP4 operands are exact in bf16; UFP4/int4, e2m1 and NVFP4 operand elements
  each get one extra bf16 rounding, so their losses drift from emulated's.  Off CUDA the bf16 GEMM
  is an fp32 GEMM of the bf16 operands upcast (exact), so there only the operand rounding is measured
  (MXFP4 then stays bitwise equal); on CUDA the bf16 GEMM's accumulation order differs as well.

Without ``--data`` the test sample tests/data/shakespeare_sample.txt is prepared into a temporary
directory (512-token BPE vocabulary, as tests/conftest.py does).  The default model is tiny (hidden 64,
2 layers, 4 heads, ffn 128, vocab 512, seq 64, micro batch 4); extra ``key=value`` overrides are
applied last.  Without CUDA the Triton kernels run in the Triton interpreter (TRITON_INTERPRET=1,
set here before anything defines a kernel): numerics only, timings are information, not speed.
"""
from __future__ import annotations

import os

import torch

# Must precede every import that defines Triton kernels (megatron_ufp4.*).
INTERPRETED = False
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    INTERPRETED = True

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from megatron_ufp4.config import load_config  # noqa: E402
from megatron_ufp4.training.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "shakespeare_sample.txt"
BACKENDS = ("emulated", "triton", "triton_bf16")
TINY = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=128",
        "model.num_layers=2", "model.vocab_size=512", "model.max_seq_len=64",
        "data.seq_len=64", "training.micro_batch_size=4", "training.global_batch_size=4",
        "training.eval_iters=2"]
# Every step logged; no checkpoints (nothing but metrics.jsonl is written to the run dir).
FIXED = ["logging.interval=1", "checkpoint.interval=0", "checkpoint.save_final=false"]


def prepare_sample(tmp: Path) -> str:
    """tests/conftest.py's ``shakespeare_prefix``: 512-token BPE, one document per paragraph."""
    from megatron_ufp4.data import prepare

    prefix = str(tmp / "data" / "shk")
    Path(prefix).parent.mkdir(parents=True)
    # prepare.prepare (not main): main installs a SIGTERM handler.
    prepare.prepare(prepare.parse_args(["--input", str(SAMPLE), "--output", prefix, "--vocab-size", "512",
                                        "--split-paragraphs", "--val-fraction", "0.1", "--seed", "0"]))
    return prefix


def data_vocab(prefix: str) -> int | None:
    meta = Path(prefix + ".json")
    if meta.is_file():
        return json.loads(meta.read_text()).get("vocab_size")
    return None


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(config: str, overrides: list[str], run_dir: Path) -> dict:
    cfg = load_config(config, [*overrides, f"training.run_dir={run_dir}"])
    t0 = time.perf_counter()
    Trainer(cfg, console=lambda *a, **k: None).train()
    seconds = time.perf_counter() - t0
    recs = [r for r in read_records(run_dir) if "loss" in r and "step" in r]
    by_step: dict[int, dict] = {}
    for r in recs:  # one record per step; a resumed/duplicated step keeps its last record
        by_step[r["step"]] = r
    steps = sorted(by_step)
    losses = [by_step[s]["loss"] for s in steps]
    vals = [by_step[s]["val_loss"] for s in steps if by_step[s].get("val_loss") is not None]
    return dict(steps=steps, losses=losses, val=vals[-1] if vals else None, seconds=seconds)


def fmt(x: float | None, digits: int = 6) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def compare(ref: dict, run: dict) -> tuple[float, str]:
    """(max |loss - ref loss| over common steps, bitwise verdict)."""
    if run["steps"] != ref["steps"]:
        return math.nan, f"no (steps differ: {len(run['steps'])} vs {len(ref['steps'])})"
    diffs = [abs(a - b) for a, b in zip(run["losses"], ref["losses"])]
    same = [a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(run["losses"], ref["losses"])]
    if all(same):
        return max(diffs, default=0.0), f"yes ({len(same)}/{len(same)} steps)"
    first = run["steps"][same.index(False)]
    return max(diffs), f"no ({sum(same)}/{len(same)} steps equal; first differs at step {first})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared data prefix (<prefix>.bin/.idx); default: the test sample, "
                                   "prepared into a temp dir")
    ap.add_argument("--recipes", default="ufp4,nvfp4,mxfp4")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny_dense.yaml"))
    ap.add_argument("--backends", default=",".join(BACKENDS), help="the first one is the reference")
    ap.add_argument("overrides", nargs="*", help="extra config overrides (applied last), e.g. optimizer.lr=1e-3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    backends = args.backends.split(",")

    with tempfile.TemporaryDirectory(prefix="bench_operand_dtype_") as tmp_s:
        tmp = Path(tmp_s)
        if args.data:
            prefix, source = args.data, args.data
        else:
            prefix = prepare_sample(tmp)
            source = f"{SAMPLE.relative_to(REPO)} (prepared: 512-token BPE, 10% validation)"
        base = [*TINY]
        vocab = data_vocab(prefix)
        if vocab and vocab > 512:  # a user's larger vocabulary: round the embedding up to a multiple of 64
            base.append(f"model.vocab_size={-(-vocab // 64) * 64}")
        base += [f"data.prefix={prefix}", f"training.train_steps={args.steps}", *FIXED, *args.overrides]

        cfg0 = load_config(args.config, [*base, f"recipe.name={args.recipes.split(',')[0]}",
                                         f"training.run_dir={tmp / 'probe'}"])
        m, t = cfg0.model, cfg0.training
        if INTERPRETED:
            print("No CUDA: set TRITON_INTERPRET=1 (Triton kernels run in the Triton interpreter on CPU; "
                  "numerics only, timings are not kernel speed).")
            print("Off CUDA triton_bf16's GEMM runs in fp32 on the bf16 operands (exact upcast): only the "
                  "operand rounding differs from triton here.")
        else:
            mode = "interpreter (TRITON_INTERPRET set by caller)" if os.environ.get("TRITON_INTERPRET") else (
                "compiled kernels" if torch.cuda.is_available() else "TRITON_INTERPRET set by caller")
            print(f"Triton: {mode}.")
        print(f"data: {source}")
        print(f"model: {Path(args.config).name} + overrides -> hidden {m.hidden_size}, {m.num_layers} layers, "
              f"{m.num_heads} heads ({m.num_kv_heads} kv), ffn {m.ffn_hidden_size}, vocab {m.vocab_size}; "
              f"seq {cfg0.data.seq_len}, micro batch {t.micro_batch_size}, global batch {t.global_batch_size}; "
              f"{args.steps} steps, seed {t.seed}, dtype {t.dtype}, {torch.get_num_threads()} thread")
        if args.overrides:
            print(f"extra overrides: {' '.join(args.overrides)}")
        print()

        for recipe in args.recipes.split(","):
            results = {}
            for backend in backends:
                run_dir = tmp / f"{recipe}_{backend}"
                results[backend] = run_one(args.config, [*base, f"recipe.name={recipe}", f"gemm.backend={backend}"],
                                           run_dir)
                print(f"  [{recipe} / {backend}: {results[backend]['seconds']:.1f} s]", flush=True)
            ref = results[backends[0]]
            print(f"\n### {recipe}\n")
            print(f"| backend | final train loss | max step \\|loss - {backends[0]}\\| | per-step losses bitwise = "
                  f"{backends[0]} | final val loss | time (info) |")
            print("|---|---|---|---|---|---|")
            for backend in backends:
                r = results[backend]
                if backend == backends[0]:
                    dmax, verdict = "-", "(reference)"
                else:
                    d, verdict = compare(ref, r)
                    dmax = f"{d:.3e}"
                final = r["losses"][-1] if r["losses"] else None
                print(f"| {backend} | {fmt(final)} | {dmax} | {verdict} | {fmt(r['val'])} | {r['seconds']:.1f} s |")
            print(flush=True)


if __name__ == "__main__":
    main()
