"""FP4 quantizer and quantized-linear throughput, as ratios measured side by side.

    python bench/bench_fp4.py [--size 4096] [--repeat 5] [--skip-fused]

1. quantize+dequantize of a size x size fp32 tensor per format, with and without RHT,
   eager and fused (torch.compile), as a multiple of a plain tensor copy;
2. QuantizedLinear forward+backward per recipe at a few shapes, as a multiple of the
   bf16 recipe (F.linear) on the same inputs.
Prints markdown tables (pasted into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from megatron_ufp4.fp4 import RHT, fake_quantize, quantize
from megatron_ufp4.fp4.recipes import PRESETS
from megatron_ufp4.linear import QuantizedLinear


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def bench_quantizer(size: int, repeat: int, fused: bool) -> None:
    x = torch.randn(size, size)
    copy_ms = timeit(lambda: x.clone(), repeat)
    print(f"\n### quantize+dequantize, {size}x{size} fp32 (plain copy = {copy_ms:.1f} ms)\n")
    cols = ["format", "RHT", "storage path (codes)", "fake-quant eager"] + (["fake-quant fused"] if fused else [])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for fmt in ("e2m1", "int4", "nvfp4", "mxfp4"):
        for rht in (None, RHT(32 if fmt == "mxfp4" else 16, 0)):
            row = [fmt, "yes" if rht else "no"]
            ms = timeit(lambda: quantize(x, fmt, rht=rht).dequantize(rotated=True), repeat)
            row.append(f"{ms:.0f} ms ({ms / copy_ms:.1f}x)")
            ms = timeit(lambda: fake_quantize(x, fmt, rht=rht), repeat)
            row.append(f"{ms:.0f} ms ({ms / copy_ms:.1f}x)")
            if fused:
                ms = timeit(lambda: fake_quantize(x, fmt, rht=rht, fused=True), repeat)
                row.append(f"{ms:.0f} ms ({ms / copy_ms:.1f}x)")
            print("| " + " | ".join(row) + " |")


def bench_linear(shapes, repeat: int, backends) -> None:
    print("\n### QuantizedLinear forward+backward, ratio to the bf16 recipe (F.linear), fp32 inputs\n")
    recipes = [r for r in PRESETS if r != "bf16"]
    cols = ["tokens x in x out", "bf16 recipe"] + [f"{r} ({b})" for b in backends for r in recipes]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for tokens, fin, fout in shapes:
        x = torch.randn(tokens, fin, requires_grad=True)
        dy = torch.randn(tokens, fout)

        def step(lin):
            def run():
                lin.weight.grad = None
                x.grad = None
                lin(x).backward(dy)
            return run

        base = timeit(step(QuantizedLinear(fin, fout, False, "bf16")), repeat)
        row = [f"{tokens}x{fin}x{fout}", f"{base:.1f} ms"]
        for b in backends:
            for r in recipes:
                ms = timeit(step(QuantizedLinear(fin, fout, False, r, backend=b)), repeat)
                row.append(f"{ms / base:.2f}x")
        print("| " + " | ".join(row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-fused", action="store_true", help="skip the torch.compile'd variants")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    bench_quantizer(args.size, args.repeat, not args.skip_fused)
    backends = ["emulated"] + ([] if args.skip_fused else ["fused"])
    bench_linear([(2048, 512, 512), (2048, 1024, 4096), (8192, 1024, 1024)], args.repeat, backends)


if __name__ == "__main__":
    main()
