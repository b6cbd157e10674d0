"""Run tests under every CPU dispatch level torch offers, each with its own Inductor cache.

torch picks its CPU kernels by vector instruction set, so float results (and the FP4 codes
rounded from them) can differ by a last bit between machines.  A numerical test must pass
at every level; this runs the selected tests once per (level, intra-op threads) in a fresh
``TORCHINDUCTOR_CACHE_DIR`` and prints a module x run table of passed/failed counts.

    python tools/sweep_cpu_levels.py                          # numerical modules, every level, 1 and 2 threads
    python tools/sweep_cpu_levels.py --all --threads 2        # the whole suite, every level
    python tools/sweep_cpu_levels.py --levels default tests/test_pipeline.py
    python tools/sweep_cpu_levels.py --markdown sweep.md      # also write the table as markdown

Levels the CPU lacks are skipped with a line (torch would silently run a lower one).
The exit status is 1 when any run had a failure or error.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEVELS = ("default", "avx2", "avx512")


def reported_level(level: str) -> str:
    """The capability torch actually uses when asked for ``level`` (lower if the CPU lacks it)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().lower()


def run_pytest(level: str, threads: int, selection: list[str], report: Path) -> float:
    with tempfile.TemporaryDirectory(prefix=f"inductor-{level}-") as cache:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "OMP_NUM_THREADS": str(threads),
               "TORCHINDUCTOR_CACHE_DIR": cache}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "900",
                        f"--junitxml={report}", *selection], cwd=REPO, env=env)
        return time.perf_counter() - start


def module_counts(report: Path) -> dict[str, dict[str, int]]:
    """module -> {"passed", "failed", "skipped"} from a pytest junit report."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1] or "?"
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        counts[module][outcome] += 1
    return counts


def cell(c: dict[str, int] | None) -> str:
    if c is None:
        return "-"
    ran = c["passed"] + c["failed"]
    return f"{c['passed']}/{ran}" if not c["failed"] else f"**{c['failed']} failed** of {ran}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tests", nargs="*", help="pytest selection (default: the modules marked numerical)")
    ap.add_argument("--all", action="store_true", help="the whole suite instead of the numerical modules")
    ap.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="intra-op thread counts (OMP_NUM_THREADS)")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    if any(t < 1 for t in args.threads):
        print("error: --threads must be positive", file=sys.stderr)
        return 2
    selection = args.tests or ([] if args.all else ["-m", "numerical"])

    runs, tables, seconds = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        for level in args.levels:
            if reported_level(level) != level:
                print(f"skipping {level}: this CPU does not support it", flush=True)
                continue
            for threads in args.threads:
                name = f"{level} x{threads}"
                print(f"== {name}", flush=True)
                report = Path(tmp) / f"{level}-{threads}.xml"
                seconds[name] = run_pytest(level, threads, selection, report)
                tables[name] = module_counts(report) if report.is_file() else {}
                runs.append(name)

    modules = sorted({m for t in tables.values() for m in t})
    lines = ["| module | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {m} | " + " | ".join(cell(tables[r].get(m)) for r in runs) + " |" for m in modules]
    lines.append("| wall time | " + " | ".join(f"{seconds[r]:.0f} s" for r in runs) + " |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    failed = any(c["failed"] for t in tables.values() for c in t.values()) or any(not t for t in tables.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
