"""Collect a study's runs and compute its results: ``report.json`` and ``report.md``.

Definitions (docs/studies.md):
- final validation loss: the mean over the study's fixed validation windows of the final
  checkpoint, with its per-window standard error (evaluation noise);
- BF16-relative gap of an arm, per seed: ``100 (L_arm - L_ref) / L_ref`` %, with the paired
  per-window standard error of the difference (same windows, so it is small);
- the paper's gap: the same of the training loss averaged over the last ``final_window`` steps;
- across seeds: mean, sd and the 95 % t-interval; paired differences between arms by seed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..model import num_params
from ..training.evaluation import paired_standard_error
from ..training.run_info import read_run_info
from .runner import read_eval, stale_keys
from .spec import Study, study_dict
from .stats import effective_ratio, fit_power_law, paired_difference, summary


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill
    return out


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def sweep_x(study: Study, cfg) -> float:
    """The sweep's x: non-embedding parameters (size) or training tokens (tokens)."""
    if study.sweep_kind == "tokens":
        return float(cfg.training.train_steps * cfg.training.global_batch_size * cfg.data.seq_len)
    m = cfg.model
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    return float(num_params(m).active - embeddings)


def collect(study: Study) -> list[dict]:
    runs = []
    for run in study.runs():
        cfg = study.run_config(run)
        stale = stale_keys(study, run)  # trained with another config: its numbers are not this study's
        records = [] if stale else read_metrics(run.run_dir)
        t = cfg.training
        runs.append({
            "key": run.key, "point": run.point, "arm": run.arm, "seed": run.seed, "run_dir": str(run.run_dir),
            "info": None if stale else read_run_info(run.run_dir), "eval": None if stale else read_eval(run),
            "stale": list(stale), "x": sweep_x(study, cfg),
            "tokens_per_step": t.global_batch_size * cfg.data.seq_len, "train_steps": t.train_steps,
            "train": [(r["step"], r["loss"]) for r in records if r.get("loss") is not None],
            "val": [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None],
            "clipped": sum(r.get("clipped", 0) for r in records),
            "skipped": max((r.get("skipped_total", 0) for r in records), default=0),
            "step_time_s": _median([r["step_time_s"] for r in records if "step_time_s" in r]),
        })
    return runs


def _final_window_mean(run: dict, window: int) -> float | None:
    last = [loss for step, loss in run["train"] if step > run["train_steps"] - window]
    return math.fsum(last) / len(last) if last and len(last) == window else None


def _fingerprints(runs: list[dict], seeds) -> dict:
    """Per seed: do the arms share initial weights and data order (as run_info.json recorded)?"""
    out = {}
    for seed in seeds:
        infos = {r["arm"]: (r["info"] or {}).get("fingerprint", {}) for r in runs if r["seed"] == seed}
        res = {}
        for what in ("init", "data_order"):
            values = {a: fp.get(what) for a, fp in infos.items()}
            known = {a: v for a, v in values.items() if v}
            if len(known) < len(values):
                res[what] = "unavailable for " + ", ".join(sorted(set(values) - set(known)))
            elif len(set(known.values())) == 1:
                res[what] = "identical"
            else:
                groups: dict = {}
                for a, v in known.items():
                    groups.setdefault(v, []).append(a)
                res[what] = "differs: " + " | ".join(", ".join(g) for g in groups.values())
        out[str(seed)] = res
    return out


def point_results(study: Study, runs: list[dict]) -> dict:
    ref = study.reference
    arms = list(study.arms)
    by = {(r["arm"], r["seed"]): r for r in runs}
    final = {a: {s: by[a, s]["eval"] for s in study.seeds if by[a, s]["eval"]} for a in arms}
    out = {"labels": {a: sorted({(by[a, s]["info"] or {}).get("label", "?") for s in study.seeds}) for a in arms},
           "final": {a: {str(s): {"loss": e["loss"], "se": e["se"], "windows": e["windows"]}
                         for s, e in final[a].items()} for a in arms},
           "fingerprints": _fingerprints(runs, study.seeds)}
    tw = {a: {s: v for s in study.seeds if (v := _final_window_mean(by[a, s], study.final_window)) is not None}
          for a in arms}
    out["train_window_loss"] = {a: {str(s): v for s, v in tw[a].items()} for a in arms}
    out["throughput"] = {a: {"median_step_time_s": _median([by[a, s]["step_time_s"] for s in study.seeds
                                                            if by[a, s]["step_time_s"]]),
                             "clipped_steps": sum(by[a, s]["clipped"] for s in study.seeds),
                             "skipped_steps": sum(by[a, s]["skipped"] for s in study.seeds)} for a in arms}
    out["loss"] = {a: summary([e["loss"] for e in final[a].values()]) for a in arms}
    if ref is None:
        return out
    gaps, gap_se, tgaps = {}, {}, {}
    for a in arms:
        gaps[a], gap_se[a], tgaps[a] = {}, {}, {}
        for s in study.seeds:
            e, r = final[a].get(s), final[ref].get(s)
            if e and r:
                gaps[a][s] = 100 * (e["loss"] - r["loss"]) / r["loss"]
                gap_se[a][s] = 100 * paired_standard_error(e["window_losses"], r["window_losses"]) / r["loss"]
            if s in tw[a] and s in tw[ref]:
                tgaps[a][s] = 100 * (tw[a][s] - tw[ref][s]) / tw[ref][s]
    out["gap_pct"] = {a: {**summary(list(gaps[a].values())), "per_seed": {str(s): v for s, v in gaps[a].items()},
                          "per_seed_eval_se": {str(s): v for s, v in gap_se[a].items()}}
                      for a in arms if a != ref}
    out["train_gap_pct"] = {a: {**summary(list(tgaps[a].values())),
                                "per_seed": {str(s): v for s, v in tgaps[a].items()}} for a in arms if a != ref}
    out["pairs"] = {f"{a} - {b}": {k: v for k, v in paired_difference(gaps[a], gaps[b]).items()}
                    for a, b in study.pairs}
    for v in out["pairs"].values():
        v["per_seed"] = {str(s): d for s, d in v["per_seed"].items()}
    return out


def sweep_results(study: Study, runs: list[dict], per_point: dict) -> dict | None:
    if not study.points:
        return None
    xs = {p: next(r["x"] for r in runs if r["point"] == p) for p in study.points}
    fits = {}
    for a in study.arms:
        pts = [(xs[p], per_point[p]["loss"][a]) for p in study.points if per_point[p]["loss"][a]["n"]]
        x = [v for v, _ in pts]
        y = [s["mean"] for _, s in pts]
        sd = [s["sd"] / math.sqrt(s["n"]) if s["sd"] else None for _, s in pts]
        sigma = sd if all(v for v in sd) else None
        fits[a] = {"x": x, "loss": y, "sem": sd, "fit": fit_power_law(x, y, sigma)}
    ref = study.reference
    if ref is not None and fits.get(ref, {}).get("fit"):
        for a in study.arms:
            if a != ref:
                f = fits[a]
                sigma = f["sem"] if all(v for v in f["sem"]) else None
                f["effective_ratio"] = effective_ratio(fits[ref]["fit"], f["x"], f["loss"], sigma)
    return {"kind": study.sweep_kind, "x": xs, "arms": fits}


OPERANDS = [("fprop", "x"), ("fprop", "w"), ("dgrad", "dy"), ("dgrad", "w"), ("wgrad", "dy"), ("wgrad", "x")]


def probe_results(study: Study) -> dict | None:
    """The fidelity probes of every seed (per sweep point), averaged over seeds."""
    if not study.probes:
        return None
    out = {}
    for point in (list(study.points) or [None]):
        files = {}
        for seed in study.seeds:
            p = study.out_dir / "probes" / (point or "") / f"seed_{seed}.json"
            try:
                f = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(f, dict) and isinstance(f.get("recipes"), dict):
                files[seed] = f
        res = {"seeds": sorted(files), "recipes": {}}
        for name in study.probes["recipes"]:
            per = [f["recipes"][name] for f in files.values() if name in f.get("recipes", {})]
            if not per:
                continue
            layers = list(per[0]["gradients"])
            grads = {layer: {k: summary([r["gradients"][layer][k] for r in per
                                         if r["gradients"].get(layer, {}).get(k) is not None])
                             for k in ("norm_ratio", "cosine")} for layer in layers}
            ops = {}
            for g, role in OPERANDS:  # per GEMM operand: the mean over the model's quantized linears
                for k in ("sqnr_db", "alpha", "saturated", "zeroed"):
                    vals = [st[g][role][k] for r in per for st in r["operands"].values()
                            if g in st and role in st[g] and st[g][role].get(k) is not None]
                    ops.setdefault(f"{g}.{role}", {})[k] = math.fsum(vals) / len(vals) if vals else None
            per_layer_sqnr = {}
            for mod in per[0]["operands"]:
                vals = [st.get(k) for r in per for gm in r["operands"].get(mod, {}).values() for st in gm.values()
                        for k in ("sqnr_db",) if isinstance(st, dict)]
                vals = [v for v in vals if v is not None]
                per_layer_sqnr[mod] = math.fsum(vals) / len(vals) if vals else None
            res["recipes"][name] = {"label": per[0]["label"], "loss_diff": summary([r["loss_diff"] for r in per]),
                                    "gradients": grads, "operands": ops, "module_sqnr_db": per_layer_sqnr}
        out[str(point)] = res
    return out


def build_report(study: Study) -> dict:
    runs = collect(study)
    points = list(study.points) or [None]
    per_point = {str(p): point_results(study, [r for r in runs if r["point"] == p]) for p in points}
    missing = [r["key"] for r in runs if r["eval"] is None]
    return {"study": study_dict(study), "missing_runs": missing, "points": per_point,
            "sweep": sweep_results(study, runs, per_point) if study.points else None,
            "probes": probe_results(study),
            "curves": {r["key"]: {"arm": r["arm"], "seed": r["seed"], "point": r["point"],
                                  "tokens_per_step": r["tokens_per_step"], "train": r["train"], "val": r["val"]}
                       for r in runs}}
