"""Plot runs from their metrics.jsonl: loss curves side by side, and a per-layer heatmap of
the quantized operands' SQNR and attenuation α (``logging.quant_stats_interval`` > 0).

    python tools/plot_metrics.py runs/a runs/b --out loss.png                  # training + validation loss
    python tools/plot_metrics.py runs/a --heatmap quant.png [--step 200]        # SQNR / alpha per layer and GEMM

Each run is labelled by what ran (``run_info.json``'s label) and its directory name.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from megatron_ufp4.study.plots import moving_average
from megatron_ufp4.study.report import read_metrics

OPERANDS = [("fprop", "x"), ("fprop", "w"), ("dgrad", "dy"), ("dgrad", "w"), ("wgrad", "dy"), ("wgrad", "x")]


def read_records(run: Path) -> list[dict]:
    if not (run / "metrics.jsonl").is_file():
        raise ValueError(f"{run}: no metrics.jsonl (not a run directory?)")
    return read_metrics(run)


def run_label(run: Path) -> str:
    try:
        info = json.loads((run / "run_info.json").read_text())
        return f"{info['label']} ({run.name})"
    except (OSError, ValueError, KeyError):
        return run.name


def plot_losses(runs: list[Path], out: Path, smooth: int, plt) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        recs = read_records(run)
        train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        label = run_label(run)
        if train:
            line, = ax1.plot([s for s, _ in train], moving_average([v for _, v in train], smooth), lw=1.2, label=label)
            if val:
                ax2.plot([s for s, _ in val], [v for _, v in val], marker="o", ms=3, color=line.get_color(),
                         label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss ({smooth}-step average)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def quant_table(recs: list[dict], step: int | None):
    """(step, module names, {stat: rows x OPERANDS matrix}) of one step's operand statistics."""
    with_stats = [r for r in recs if r.get("quant")]
    if not with_stats:
        raise ValueError("no operand statistics in metrics.jsonl: train with logging.quant_stats_interval=N")
    rec = with_stats[-1] if step is None else next((r for r in with_stats if r["step"] == step), None)
    if rec is None:
        raise ValueError(f"--step {step}: no statistics at that step (steps with statistics: "
                         f"{', '.join(str(r['step']) for r in with_stats[:10])}...)")
    names = list(rec["quant"])
    mats = {}
    for stat in ("sqnr_db", "alpha"):
        mats[stat] = [[(rec["quant"][n].get(g, {}).get(role) or {}).get(stat, math.nan) for g, role in OPERANDS]
                      for n in names]
    return rec["step"], names, mats


def plot_heatmap(run: Path, out: Path, step: int | None, plt) -> None:
    import numpy as np

    at, names, mats = quant_table(read_records(run), step)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(names) + 2))
    for ax, (stat, title, cmap) in zip(axes, (("sqnr_db", "SQNR (dB)", "viridis"),
                                              ("alpha", "attenuation α (1 = unbiased)", "coolwarm_r"))):
        m = np.array(mats[stat], dtype=float)
        finite = m[np.isfinite(m)]
        kw = {}
        if stat == "alpha" and finite.size:  # centred on 1, so shrinkage (< 1) and growth read apart
            half = max(abs(finite - 1).max(), 1e-4)
            kw = {"vmin": 1 - half, "vmax": 1 + half}
        im = ax.imshow(m, aspect="auto", cmap=cmap, **kw)
        ax.set_xticks(range(len(OPERANDS)), [f"{g}.{r}" for g, r in OPERANDS], rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if math.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.1f}" if stat == "sqnr_db" else f"{m[i, j]:.3f}", ha="center",
                            va="center", fontsize=6, color="w" if stat == "sqnr_db" else "k")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{run_label(run)}: quantized operands at step {at}")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def save_figure(fig, out: Path) -> None:
    """The figure at ``out`` (format from its suffix), all or nothing."""
    from megatron_ufp4.outputs import atomic_file

    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".") or "png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories")
    ap.add_argument("--out", type=Path, default=None, help="loss-curve figure (PNG)")
    ap.add_argument("--heatmap", type=Path, default=None, help="per-layer SQNR/alpha figure of the first run")
    ap.add_argument("--step", type=int, default=None, help="the heatmap's step (default: the last with statistics)")
    ap.add_argument("--smooth", type=int, default=10, help="training-loss moving average (steps)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing figure files")
    args = ap.parse_args(argv)
    if args.out is None and args.heatmap is None:
        print("error: nothing to draw: give --out and/or --heatmap", file=sys.stderr)
        return 2
    if args.smooth < 1:
        print(f"error: --smooth must be >= 1 (got {args.smooth})", file=sys.stderr)
        return 2
    from megatron_ufp4.outputs import OutputError, check_output

    try:
        for flag, path in (("--out", args.out), ("--heatmap", args.heatmap)):
            if path is not None:
                inputs = [*args.runs, *(r / "metrics.jsonl" for r in args.runs)]  # a new file beside them is fine
                check_output(path, overwrite=args.overwrite, inputs=inputs, what=flag)
        if args.out is not None and args.out == args.heatmap:
            raise OutputError(f"--out and --heatmap are the same file ({args.out})")
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import matplotlib
    except ImportError:
        print("error: plotting needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        if args.out:
            plot_losses(args.runs, args.out, args.smooth, plt)
            print(f"wrote {args.out}")
        if args.heatmap:
            plot_heatmap(args.runs[0], args.heatmap, args.step, plt)
            print(f"wrote {args.heatmap}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
