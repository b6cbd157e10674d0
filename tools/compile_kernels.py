"""Compile every Triton kernel configuration the launchers make, for GPU targets, without a GPU.

    python tools/compile_kernels.py                       # sm_90 and sm_100, the full matrix
    python tools/compile_kernels.py --targets sm_90 --subset quick
    python tools/compile_kernels.py --markdown table.md   # also write the table as markdown

Each configuration (kernel x format x rounding x RHT size x output dtype, packed, pair and
grouped variants) is recorded from the real launchers (megatron_ufp4/linear/triton_aot.py)
and compiled with Triton's own compiler and bundled ptxas.  Prints one row per
configuration and target: registers per thread, spill bytes per thread, shared
memory, CTAs per SM; then a summary per kernel.  Exit status 1 on any compile error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile for a GPU target, never interpret

from megatron_ufp4.linear.triton_aot import SUBSETS, TARGETS, compile_config, launcher_matrix  # noqa: E402


def _compile(job):
    label, config, target = job
    return label, compile_config(config, target)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--subset", default="full", choices=SUBSETS,
                    help="full; quick: RHT sizes none and 16, fp32 output; suite: what the test suite compiles")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print("error: --jobs must be positive", file=sys.stderr)
        return 2
    start = time.perf_counter()
    jobs = [(label, cfg, t) for label, cfg in launcher_matrix(args.subset) for t in args.targets]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_compile, jobs, chunksize=4))
    lines = ["| kernel | configuration | target | registers | spill bytes | shared | CTAs/SM |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results:
        if r.error:
            lines.append(f"| {r.config.kernel} | {label} | {r.target} | **compile error**: {r.error} | | | |")
        else:
            lines.append(f"| {r.config.kernel} | {label} | {r.target} | {r.registers} | {r.spill_bytes} | "
                         f"{r.shared_bytes} | {r.ctas_per_sm} |")
    lines += ["", "| kernel | target | configurations | compile errors | max registers | with spills | "
              "max spill bytes |", "|---|---|---|---|---|---|---|"]
    for kernel in sorted({r.config.kernel for _, r in results}):
        for target in args.targets:
            rs = [r for _, r in results if r.config.kernel == kernel and r.target == target]
            ok = [r for r in rs if not r.error]
            lines.append(f"| {kernel} | {target} | {len(rs)} | {len(rs) - len(ok)} | "
                         f"{max((r.registers for r in ok), default=0)} | {sum(r.spill_bytes > 0 for r in ok)} | "
                         f"{max((r.spill_bytes for r in ok), default=0)} |")
    text = "\n".join(lines)
    print(text)
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.0f} s")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 1 if any(r.error for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
