"""PNG figures of a study: loss curves, the gap over training, the final gaps, scaling fits."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def moving_average(ys, k: int) -> list[float]:
    """The mean of each value and the k - 1 before it (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _mean_curve(curves: list[list[tuple[int, float]]]):
    """Mean over seeds at the steps every seed has."""
    common = set.intersection(*(set(s for s, _ in c) for c in curves)) if curves else set()
    steps = sorted(common)
    maps = [dict(c) for c in curves]
    return steps, [sum(m[s] for m in maps) / len(maps) for s in steps]


def make_plots(report: dict, out_dir: Path) -> dict[str, list[str]] | None:
    """Write the figures; {point or "scaling": [file names]}, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    study = report["study"]
    arms, ref = list(study["arms"]), study["reference"]
    smooth = max(1, study["final_window"] // 5)
    out: dict[str, list[str]] = {}
    for point, res in report["points"].items():
        curves = [c for c in report["curves"].values() if str(c["point"]) == point]
        tag = "" if point == "None" else f"_{point}"
        files = []
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for a in arms:
            cs = [c for c in curves if c["arm"] == a and c["train"]]
            if not cs:
                continue
            steps, mean = _mean_curve([c["train"] for c in cs])
            tokens = [s * cs[0]["tokens_per_step"] for s in steps]
            ax.plot(tokens, moving_average(mean, smooth), label=f"{a} ({len(cs)} seeds)", lw=1.2)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"training loss (mean over seeds, {smooth}-step average)")
        finals = [m for c in curves for _, m in c["train"][-study["final_window"]:]]
        if finals:  # zoom on the end, where the recipes differ
            lo, hi = min(finals), max(finals)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 1.5 * (hi - lo + 1e-3))
        _legend(ax)
        ax.grid(alpha=0.3)
        ax.set_title(f"{study['name']}{tag}: loss curves")
        files.append(_save(fig, out_dir, f"loss_curves{tag}.png", plt))
        if ref and "gap_pct" in res:
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
            for a in arms:
                if a == ref:
                    continue
                gaps = []
                for c in (c for c in curves if c["arm"] == a and c["val"]):
                    r = next((x for x in curves if x["arm"] == ref and x["seed"] == c["seed"]), None)
                    if r and r["val"]:
                        rv = dict(r["val"])
                        gaps.append([(s, 100 * (v - rv[s]) / rv[s]) for s, v in c["val"] if s in rv])
                if gaps:
                    steps, mean = _mean_curve(gaps)
                    ax1.plot([s * curves[0]["tokens_per_step"] for s in steps], mean, marker="o", ms=3, label=a)
            ax1.axhline(0, color="k", lw=0.8)
            ax1.set_xlabel("training tokens")
            ax1.set_ylabel(f"validation gap to {ref} (%, mean over seeds)")
            _legend(ax1)
            ax1.grid(alpha=0.3)
            names = list(res["gap_pct"])
            for i, a in enumerate(names):
                g = res["gap_pct"][a]
                ys = list(g["per_seed"].values())
                ax2.scatter([i] * len(ys), ys, s=14, alpha=0.6)
                if g.get("ci"):
                    ax2.errorbar([i + 0.15], [g["mean"]], yerr=[[g["mean"] - g["ci"][0]], [g["ci"][1] - g["mean"]]],
                                 fmt="s", color="k", capsize=4, ms=4)
            ax2.axhline(0, color="k", lw=0.8)
            ax2.set_xticks(range(len(names)), names)
            ax2.set_ylabel(f"final gap to {ref} (%): seeds, mean and 95 % CI")
            ax2.grid(alpha=0.3, axis="y")
            fig.suptitle(f"{study['name']}{tag}")
            files.append(_save(fig, out_dir, f"gaps{tag}.png", plt))
        out[point] = files
    sw = report.get("sweep")
    if sw:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for a, f in sw["arms"].items():
            if not f["x"]:
                continue
            line = ax.errorbar(f["x"], f["loss"], yerr=[v or 0 for v in f["sem"]], fmt="o", label=a, capsize=3)
            fit = f.get("fit") or {}
            if "A" in fit:
                lo, hi = min(f["x"]), max(f["x"])
                xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
                ax.plot(xs, [fit["A"] * x ** -fit["alpha"] + fit["E"] for x in xs], color=line[0].get_color(), lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters" if sw["kind"] == "size" else "training tokens")
        ax.set_ylabel("final validation loss (mean over seeds)")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        out["scaling"] = [_save(fig, out_dir, "scaling.png", plt)]
    for point, res in (report.get("probes") or {}).items():
        if res["recipes"]:
            tag = "" if point == "None" else f"_{point}"
            out[f"probes_{point}"] = [_probe_figure(res, out_dir, f"probes{tag}.png", plt)]
    return out


def _probe_figure(res: dict, out_dir: Path, name: str, plt) -> str:
    """Per layer: gradient norm ratio, gradient cosine and operand SQNR, one line per recipe."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for recipe, r in res["recipes"].items():
        layers = list(r["gradients"])
        for ax, key in zip(axes[:2], ("norm_ratio", "cosine")):
            ys = [r["gradients"][layer][key]["mean"] for layer in layers]
            ax.plot(range(len(layers)), ys, marker="o", ms=3, label=f"{recipe} ({r['label']})")
            ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=7)
        mods = list(r["module_sqnr_db"])
        axes[2].plot(range(len(mods)), [r["module_sqnr_db"][m] for m in mods], marker=".", lw=1, label=recipe)
        axes[2].set_xticks(range(len(mods)), mods, rotation=90, fontsize=5)
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].set_ylabel("gradient norm ratio to high precision")
    axes[1].set_ylabel("gradient cosine to high precision")
    axes[2].set_ylabel("operand SQNR (dB, mean over the GEMMs' operands)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, out_dir, name, plt)


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing drawn (e.g. no finished run): no empty legend
        ax.legend(**kw)


def _save(fig, out_dir: Path, name: str, plt) -> str:
    fig.tight_layout()
    fig.savefig(Path(out_dir) / name, dpi=120)
    plt.close(fig)
    return name

