"""``report.md``: a study's results as tables a reader can check against ``report.json``."""
from __future__ import annotations


def _f(v, digits=4, signed=False) -> str:
    if v is None:
        return "—"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _ci(s: dict, digits=3) -> str:
    return f"[{s['ci'][0]:+.{digits}f}, {s['ci'][1]:+.{digits}f}]" if s.get("ci") else "—"


def _stats_cells(s: dict) -> str:
    """mean | median | sd | 95 % CI of a seed-level summary."""
    return f"{_f(s['mean'], 3, True)} | {_f(s['median'], 3, True)} | {_f(s['sd'], 3)} | {_ci(s)}"


def _point_section(study: dict, res: dict, plots: list[str]) -> list[str]:
    ref = study["reference"]
    seeds = [str(s) for s in study["seeds"]]
    arms = list(study["arms"])
    lines = ["### Final validation loss", "",
             f"Mean over {study['eval_windows']} fixed validation windows of each run's final checkpoint; "
             "± is the per-window standard error (evaluation noise only).", "",
             "| arm | runs as | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd over seeds |",
             "|---|---|" + "---|" * len(seeds) + "---|"]
    for a in arms:
        cells = []
        for s in seeds:
            e = res["final"][a].get(s)
            cells.append(f"{e['loss']:.4f} ± {e['se']:.4f}" if e else "—")
        lo = res["loss"][a]
        agg = f"{lo['mean']:.4f} ± {lo['sd']:.4f}" if lo.get("sd") is not None else _f(lo.get("mean"))
        lines.append(f"| {a} | {', '.join(res['labels'][a])} | " + " | ".join(cells) + f" | {agg} |")
    if ref and "gap_pct" in res:
        lines += ["", f"### Gap to {ref} (% of its validation loss)", "",
                  "Per seed: the gap and, in parentheses, its paired per-window standard error (the same "
                  "windows score both runs).  Across seeds: mean, sd and the 95 % t-interval of the mean; the "
                  f"paper's definition uses the training loss averaged over the last {study['final_window']} "
                  "steps instead.", "",
                  "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | median | sd | 95 % CI | paper's gap "
                  "(train, mean ± sd) |", "|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
        for a, g in res["gap_pct"].items():
            cells = [f"{g['per_seed'][s]:+.3f} ({g['per_seed_eval_se'][s]:.3f})" if s in g["per_seed"] else "—"
                     for s in seeds]
            tg = res["train_gap_pct"][a]
            paper = f"{tg['mean']:+.3f} ± {tg['sd']:.3f}" if tg.get("sd") is not None else _f(tg.get("mean"), 3, True)
            lines.append(f"| {a} | " + " | ".join(cells) + f" | {_stats_cells(g)} | {paper} |")
    if res.get("pairs"):
        lines += ["", "### Paired differences of the gap (percentage points, by seed)", "",
                  "| A − B | per seed | mean | median | sd | 95 % CI | A − B > 0 / < 0 |",
                  "|---|---|---|---|---|---|---|"]
        for name, p in res["pairs"].items():
            per = ", ".join(f"{v:+.3f}" for v in p["per_seed"].values())
            lines.append(f"| {name} | {per} | {_stats_cells(p)} | {p['positive']} / {p['negative']} |")
    lines += ["", "### Runs", "", "| arm | median step (s) | clipped steps | skipped steps |", "|---|---|---|---|"]
    for a in arms:
        t = res["throughput"][a]
        lines.append(f"| {a} | {_f(t['median_step_time_s'], 3)} | {t['clipped_steps']} | {t['skipped_steps']} |")
    lines += ["", "Shared initial weights and data order within each seed (recorded by every run in run_info.json):",
              ""]
    for s, fp in res["fingerprints"].items():
        lines.append(f"- seed {s}: initial weights {fp['init']}; data order {fp['data_order']}")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return lines


def _probe_section(study: dict, point: str, res: dict, plots: list[str]) -> list[str]:
    pr = study["probes"]
    recipes = list(res["recipes"])
    lines = [f"## Fidelity probes{'' if point == 'None' else ' at ' + point}", "",
             f"Each recipe on the final weights of the `{pr['arm']}` runs (seeds {res['seeds']}), on the same "
             f"{pr['batches']} x {pr['batch_size']} validation windows, against every GEMM in high precision.  "
             "Means over seeds (± sd where there are several).", "",
             "| recipe | runs as | forward loss − high precision |", "|---|---|---|"]
    for name, r in res["recipes"].items():
        d = r["loss_diff"]
        sd = f" ± {d['sd']:.5f}" if d.get("sd") else ""
        lines.append(f"| {name} | {r['label']} | {d['mean']:+.5f}{sd} |")
    if not recipes:
        return lines + ["", "(no probe results yet)"]
    layers = list(res["recipes"][recipes[0]]["gradients"])
    for key, title in (("norm_ratio", "Gradient norm ratio ‖g_FP4‖ / ‖g_high‖ per layer (below 1: shrinkage)"),
                       ("cosine", "Gradient cosine to high precision per layer")):
        lines += ["", f"### {title}", "", "| layer | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
        for layer in layers:
            cells = []
            for name in recipes:
                s = res["recipes"][name]["gradients"].get(layer, {}).get(key, {})
                cells.append(_f(s.get("mean"), 4) + (f" ± {s['sd']:.4f}" if s.get("sd") else ""))
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    ops = list(res["recipes"][recipes[0]]["operands"])
    lines += ["", "### Quantized operands (mean over the model's quantized linears)", "",
              "SQNR in dB / attenuation α / saturated fraction / zeroed fraction.", "",
              "| operand | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for op in ops:
        cells = []
        for name in recipes:
            s = res["recipes"][name]["operands"].get(op, {})
            cells.append("—" if s.get("sqnr_db") is None else
                         f"{s['sqnr_db']:.2f} / {s['alpha']:.4f} / {s['saturated']:.4f} / {s['zeroed']:.4f}")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return lines + [""] + [f"![{p}]({p})" for p in plots]


def render_markdown(report: dict, plots: dict[str, list[str]]) -> str:
    study = report["study"]
    lines = [f"# Study {study['name']}", "",
             f"Base config `{study['base']}`, arms {', '.join(study['arms'])}, seeds {study['seeds']}, "
             f"reference {study['reference'] or '—'}.  Numbers: `report.json`.", ""]
    if report["missing_runs"]:
        lines += [f"**Incomplete:** {len(report['missing_runs'])} run(s) not finished or not evaluated: "
                  + ", ".join(report["missing_runs"]), ""]
    for point, res in report["points"].items():
        if point != "None":
            lines += [f"## Sweep point {point}", ""]
        lines += _point_section(study, res, plots.get(point, []))
        lines.append("")
    sw = report.get("sweep")
    if sw:
        xname = "non-embedding parameters N" if sw["kind"] == "size" else "training tokens D"
        lines += ["## Scaling", "", f"L(x) = A·x^(−α) + E fitted per arm over {xname} (weighted by the standard "
                  "error of the seed mean; standard errors need more points than parameters).  The effective "
                  f"ratio r solves L_arm(x) = A·(r·x)^(−α) + E under the reference's fit.", "",
                  "| arm | points | A | α | E | effective ratio (95 % CI) |", "|---|---|---|---|---|---|"]
        for a, f in sw["arms"].items():
            fit = f.get("fit") or {}
            if "error" in fit:
                row = f"fit failed: {fit['error']} | | |"
            elif fit:
                se = fit["stderr"]
                row = " | ".join(f"{fit[k]:.4g}" + (f" ± {se[k]:.2g}" if se[k] is not None else "")
                                 for k in ("A", "alpha", "E"))
            else:
                row = "— | — | —"
            eff = f.get("effective_ratio") or {}
            effs = (f"{eff['ratio']:.3f} [{eff['ci'][0]:.3f}, {eff['ci'][1]:.3f}]" if eff.get("ci")
                    else _f(eff.get("ratio"), 3))
            lines.append(f"| {a} | {len(f['x'])} | {row} | {effs} |")
        lines += [""] + [f"![{p}]({p})" for p in plots.get("scaling", [])]
    for point, res in (report.get("probes") or {}).items():
        lines += [""] + _probe_section(study, point, res, plots.get(f"probes_{point}", []))
    return "\n".join(lines) + "\n"
