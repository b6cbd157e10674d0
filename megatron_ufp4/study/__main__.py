"""Run a study and write its report: ``python -m megatron_ufp4.study STUDY.yaml``.

    python -m megatron_ufp4.study configs/studies/recipes.yaml             # train, evaluate, report
    python -m megatron_ufp4.study configs/studies/recipes.yaml --jobs 2    # two runs at a time
    python -m megatron_ufp4.study configs/studies/recipes.yaml --plan      # list the runs and their state
    python -m megatron_ufp4.study configs/studies/recipes.yaml --report    # report on what has finished

Finished runs are skipped and interrupted ones resume, so running it again continues a study.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ufp4-study", description=__doc__.splitlines()[0])
    ap.add_argument("study", help="study YAML (see configs/studies/)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the study's jobs)")
    ap.add_argument("--seeds", default=None,
                    help="replace the study's seeds: a count N (seeds 1..N) or a list 1,2,5")
    ap.add_argument("--out", default=None, help="output directory (default: the study's out_dir)")
    ap.add_argument("--plan", action="store_true", help="list the runs and their state; run nothing")
    ap.add_argument("--report", action="store_true", help="only write the report from the finished runs")
    ap.add_argument("--verbose", action="store_true", help="with --plan: every run's overrides too")
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        print(f"error: --jobs must be >= 1 (got {args.jobs})", file=sys.stderr)
        return 2

    from .spec import StudyError, load_study

    try:
        study = load_study(args.study, args.out, seeds=_parse_seeds(args.seeds))
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .runner import StudyRunner, status

    if args.plan:
        for run in study.runs():
            st = status(study, run)
            own = " ".join(o for o in run.overrides if not o.startswith(("training.run_dir=",)))
            print(f"{st.state:<8} {run.key:<32} step {st.step}/{st.train_steps}  {run.run_dir}")
            if args.verbose:
                print(f"         overrides: {own}")
        return 0
    failures = {}
    if not args.report:
        try:
            failures = StudyRunner(study, jobs=args.jobs).run()
        except KeyboardInterrupt:
            print("interrupted: started runs saved a checkpoint; run the study again to continue", file=sys.stderr)
            return 130
    try:
        path = write_report(study)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    if failures:
        print(f"error: {len(failures)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()),
              file=sys.stderr)
        return 1
    return 0


def _parse_seeds(text: str | None):
    if text is None:
        return None
    from .spec import StudyError
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise StudyError(f"--seeds: expected a count or a comma-separated list of integers (got {text!r})") from None
    return parts[0] if len(parts) == 1 and "," not in text else parts


def write_report(study) -> Path:
    from .markdown import render_markdown
    from .plots import make_plots
    from .report import build_report

    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(study)
    _atomic_write(out / "report.json", json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    plots = make_plots(report, out)
    if plots is None:
        print("plots skipped: matplotlib is not installed (pip install -e '.[plot]')", file=sys.stderr)
    _atomic_write(out / "report.md", render_markdown(report, plots or {}))
    return out / "report.md"


def _finite(v):
    """NaN/Inf -> None, tuples -> lists: report.json stays strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
