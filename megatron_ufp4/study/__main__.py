"""Run a study and write its report: ``python -m megatron_ufp4.study STUDY.yaml``.

    python -m megatron_ufp4.study configs/studies/recipes.yaml             # train, evaluate, report
    python -m megatron_ufp4.study configs/studies/recipes.yaml --jobs 2    # two runs at a time
    python -m megatron_ufp4.study configs/studies/recipes.yaml --plan      # list the runs and their state
    python -m megatron_ufp4.study configs/studies/recipes.yaml --report    # report on what has finished

Finished runs are skipped and interrupted ones resume, so running it again continues a study.
A run trained with another config than the study now asks (an edited arm) is not counted as
done: the study is refused with the differing keys, or trains it again with ``--rerun-stale``.
One study per ``out_dir`` at a time; SIGTERM or Ctrl-C asks the running trainings to save and
stop, and the study exits with one line.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
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
    ap.add_argument("--rerun-stale", action="store_true",
                    help="train again the runs whose config differs from what the study asks now (the old run "
                         "directories are moved aside, never deleted)")
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
    from ..training.run_dir import RunDirError, RunDirLock
    from .runner import StudyRunner, status

    if args.plan:
        for run in study.runs():
            st = status(study, run)
            own = " ".join(o for o in run.overrides if not o.startswith(("training.run_dir=",)))
            print(f"{st.state:<8} {run.key:<32} step {st.step}/{st.train_steps}  {run.run_dir}")
            if st.stale:
                print(f"         stale: {'; '.join(st.stale)}")
            if args.verbose:
                print(f"         overrides: {own}")
        return 0
    runner = StudyRunner(study, jobs=args.jobs, rerun_stale=args.rerun_stale)
    try:  # stale runs refused before anything is written (and again under the lock)
        if not args.report:
            runner.todo()
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # one study per out_dir at a time: a second is refused up front, naming the holder
        study.out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(study.out_dir, field="out_dir", what="study").acquire()
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: out_dir {study.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    failures = {}
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the study as Ctrl-C does
    try:
        if not args.report:
            failures = runner.run()
        path = write_report(study)
    except KeyboardInterrupt:
        print("interrupted: running trainings were asked to save a checkpoint and stop; run the study again to "
              "continue", file=sys.stderr)
        return 130
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release()
    print(f"report: {path}")
    if failures:
        print(f"error: {len(failures)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()),
              file=sys.stderr)
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


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

    from ..outputs import write_text

    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(study)
    write_text(out / "report.json", json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    plots = make_plots(report, out)
    if plots is None:
        print("plots skipped: matplotlib is not installed (pip install -e '.[plot]')", file=sys.stderr)
    write_text(out / "report.md", render_markdown(report, plots or {}))
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


if __name__ == "__main__":
    sys.exit(main())
