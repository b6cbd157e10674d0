"""Compile every Triton kernel configuration the launchers make, for GPU targets, without a GPU.

    python tools/compile_kernels.py                       # sm_90 and sm_100, the full matrix
    python tools/compile_kernels.py --targets sm_90 --subset quick
    python tools/compile_kernels.py --markdown table.md   # also write the table as markdown
    python tools/compile_kernels.py --match "pair nvfp4"  # only configurations whose label has this text

Each configuration (kernel x format x rounding x RHT size x output dtype, packed, pair and
grouped variants) is recorded from the real launchers (megatron_ufp4/linear/triton_aot.py)
and compiled with Triton's own compiler and bundled ptxas.  Prints one row per
configuration and target: warps, registers per thread, spill stores / loads and stack frame
per thread (bytes, from ptxas -v), shared memory, CTAs per SM, and the bytes each launch reads
and writes per element against a copy of its input (derived from the configuration, not
measured: what a memory-bound kernel's time should be at best); then a summary per kernel.
Exit status 1 on any compile error, 2 on bad arguments, 3 on any spill (``--allow-spills``
to report them without failing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile for a GPU target, never interpret

from megatron_ufp4.linear.triton_aot import (SUBSETS, TARGETS, compile_config, launcher_matrix,  # noqa: E402
                                             traffic_bytes)


def _compile(job):
    label, config, target = job
    return label, compile_config(config, target)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--subset", default="full", choices=SUBSETS,
                    help="full (what the test suite compiles); quick: RHT sizes none and 16, fp32 output")
    ap.add_argument("--match", action="append", default=[],
                    help="only configurations whose label contains this text (repeatable: any of them)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--allow-spills", action="store_true", help="exit 0 even if a configuration spills")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print("error: --jobs must be positive", file=sys.stderr)
        return 2
    start = time.perf_counter()
    jobs = [(label, cfg, t) for label, cfg in launcher_matrix(args.subset) for t in args.targets
            if not args.match or any(m in label for m in args.match)]
    if not jobs:
        print(f"error: no configuration label contains {' or '.join(map(repr, args.match))}", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_compile, jobs, chunksize=4))
    lines = ["| kernel | configuration | target | warps | registers | spill stores / loads | stack | shared | "
             "CTAs/SM | bytes read + written per element (derived) | x a copy's |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results:
        read, written = traffic_bytes(r.config)
        head = f"| {r.config.kernel} | {label} | {r.target} | {r.config.num_warps} |"
        tail = f" {read:g} + {written:g} | {(read + written) / (2 * read):.2f} |"
        if r.error:
            lines.append(f"{head} **compile error**: {r.error} | | | | |{tail}")
        else:
            lines.append(f"{head} {r.registers} | {r.spill_stores} / {r.spill_loads} | {r.stack_bytes} | "
                         f"{r.shared_bytes} | {r.ctas_per_sm} |{tail}")
    lines += ["", "| kernel | target | configurations | compile errors | max registers | with spills | "
              "max spill bytes | min CTAs/SM |", "|---|---|---|---|---|---|---|---|"]
    for kernel in sorted({r.config.kernel for _, r in results}):
        for target in args.targets:
            rs = [r for _, r in results if r.config.kernel == kernel and r.target == target]
            ok = [r for r in rs if not r.error]
            lines.append(f"| {kernel} | {target} | {len(rs)} | {len(rs) - len(ok)} | "
                         f"{max((r.registers for r in ok), default=0)} | {sum(r.spill_bytes > 0 for r in ok)} | "
                         f"{max((r.spill_bytes for r in ok), default=0)} | "
                         f"{min((r.ctas_per_sm for r in ok), default=0)} |")
    text = "\n".join(lines)
    print(text)
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.0f} s")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if any(r.error for _, r in results):
        return 1
    return 3 if not args.allow_spills and any(r.spill_bytes for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
