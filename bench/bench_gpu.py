"""GPU step time per recipe, as a multiple of the bf16 recipe measured side by side.

    python bench/bench_gpu.py                          # CUDA: 4096-sized linears + a dense-1.5b layer stack
    python bench/bench_gpu.py --out results/bench.md   # also append the tables to a file
    python bench/bench_gpu.py --device cpu --small     # tiny shapes on the CPU in seconds (smoke test)
    TRITON_INTERPRET=1 python bench/bench_gpu.py --device cpu --small --backends triton  # the kernels, interpreted

0. Quantizer kernels (when ``triton`` is among ``--backends``): one bf16 (4096, 4096) input
   quantized as each recipe's operands are (format and rounding of x, w, dy; rows merge the
   roles quantized alike) by the ``triton`` backend without and with the recipe's RHT, by
   ``triton_bf16`` (bf16 output, no RHT) and by ``emulated`` (no RHT), next to a device copy
   of the input (``x.clone()``).  Bandwidth counts bytes read + bytes written (input + output
   tensors) over the median time; the copy's bandwidth is the ceiling the kernels are held to.
   NVFP4's tensor amax is an input of the operand (its caller computes it once per tensor),
   so it is outside the timed call.

1. ``QuantizedLinear`` forward + backward (dX and dW) per recipe at tokens x in -> out
   shapes: 4096 x 4096 -> 4096, and the MLP linears of the ``dense-1.5b`` preset
   (gate_up 2048 -> 2 * 6144, down 6144 -> 2048) at 4096 tokens.
2. One training step (forward, backward, AdamW) of a stack of ``--layers`` transformer
   layers of the ``dense-1.5b`` width on (``--batch`` x ``--seq``) hidden states: the
   model's per-layer cost without the embedding and the 157k-entry output head.

Both run under bf16 autocast with fp32 master weights (``training.dtype=bf16``; ``--dtype
fp32`` turns it off).  The ``bf16`` recipe is ``F.linear`` (bf16 tensor cores); the FP4
recipes run a backend (``--backends``; default ``emulated,triton,triton_bf16`` on CUDA when
triton is installed, else ``emulated``), one row per recipe and backend.  ``emulated``: the
quantizer in torch ops and an FP32 GEMM of the dequantized operands (FP32 without TF32, so
the result is exact to the definition) -- the ratio is the cost of emulation, not of FP4
tensor cores.  ``fused`` compiles the same quantizer (Triton on CUDA; about a minute of
compiling per recipe the first time).  ``triton``: a one-pass Triton quantizer writing fp32
operands, the same FP32 GEMM (bitwise ``emulated``); ``triton_bf16``: bf16 operands and a
bf16 GEMM with FP32 accumulation.

Timing: ``--warmup`` untimed iterations (allocator, cuBLAS heuristics, compiles), then
``--repeat`` iterations each between two CUDA events (``torch.cuda.Event(enable_timing=True)``,
recorded on the current stream, synchronised at the end); the median is reported.  On the
CPU, ``time.perf_counter`` around each iteration.  The quantizer kernels (5 x ``--repeat``
iterations) take tens of microseconds at 4096 x 4096, about what the Python around their
launch takes, so the GPU is first held by ``torch.cuda._sleep`` while the host queues every
timed call: the events then bracket device work, not launch overhead.  An L2-sized buffer is
zeroed before each call (outside its events) so no call reads the previous one's data from
L2.  A call that synchronises (a blocking host-to-device copy) drains that queue; its cell
is marked and its time includes the host work after the sync.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from megatron_ufp4.fp4.hadamard import RHT  # noqa: E402
from megatron_ufp4.fp4.quantize import tensor_amax  # noqa: E402
from megatron_ufp4.fp4.recipes import PRESETS, Recipe  # noqa: E402
from megatron_ufp4.linear import QuantizedLinear  # noqa: E402
from megatron_ufp4.linear.backends import Operand, get_backend  # noqa: E402
from megatron_ufp4.model import GPTModel, LinearFactory, preset  # noqa: E402
from megatron_ufp4.parallel.optimizer import param_groups  # noqa: E402

PRESET = "dense-1.5b"
L2_FLUSH_BYTES = 256 * 2 ** 20  # above the L2 of any current GPU (H100/H200: 50 MB)
SLEEP_CYCLES_PER_S = 2e9  # about an H100/H200 boost clock; a slower clock only sleeps longer
SR_KEY = 1234


def linear_shapes(small: bool) -> list[tuple[str, int, int, int]]:
    """(label, tokens, in_features, out_features)."""
    if small:
        return [("64x64->64", 64, 64, 64), ("mlp gate_up 64->256", 64, 64, 256), ("mlp down 128->64", 64, 128, 64)]
    p = preset(PRESET)
    h, f = p.hidden_size, p.ffn_hidden_size
    return [("4096x4096->4096", 4096, 4096, 4096),
            (f"{PRESET} gate_up {h}->{2 * f}", 4096, h, 2 * f),
            (f"{PRESET} down {f}->{h}", 4096, f, h)]


def stack_config(small: bool, layers: int):
    if small:
        return preset(PRESET, num_layers=layers, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                      max_seq_len=64, vocab_size=256)
    return preset(PRESET, num_layers=layers, vocab_size=256)  # the vocabulary is unused (no embedding / head)


def make_timer(device: torch.device, queue_ahead: bool = False):
    """``measure(fn, warmup, repeat)``; ``queue_ahead``: device time of short kernels (module docstring)."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if queue_ahead and device.type == "cuda" \
        else None

    def measure(fn, warmup: int, repeat: int) -> float:
        """Median milliseconds of ``fn()`` over ``repeat`` timed runs after ``warmup`` untimed ones."""
        host = []
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeat)]
            if flush is not None:
                # long enough for the host to queue every timed call (min: the warm-up's first call compiles)
                host_s = min(host) if host else 1e-3
                torch.cuda._sleep(int(min(1.0, 2 * repeat * host_s + 1e-3) * SLEEP_CYCLES_PER_S))
            for start, end in events:
                if flush is not None:
                    flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
            times = [start.elapsed_time(end) for start, end in events]
        else:
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return measure


def autocast_ctx(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_linear(device, recipe, backend, tokens, k, n, dtype, measure, warmup, repeat) -> float:
    torch.manual_seed(0)
    m = QuantizedLinear(k, n, bias=False, recipe=recipe, backend=backend, device=device)
    x = torch.randn(tokens, k, device=device).requires_grad_(True)
    dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)

    def step():
        m.weight.grad = None
        x.grad = None
        with autocast_ctx(device, dtype):
            y = m(x)
        y.backward(dy)

    return measure(step, warmup, repeat)


def bench_stack(device, recipe, backend, cfg, batch, seq, dtype, measure, warmup, repeat) -> tuple[float, float | None]:
    """(median step ms, peak GiB allocated on CUDA or None)."""
    torch.manual_seed(0)
    factory = LinearFactory(recipe, num_layers=cfg.num_layers, backend=backend, seed=0)
    with torch.device(device):
        model = GPTModel(cfg, factory, init_seed=0)
    model.embed = model.head = model.norm = None  # hidden states in, hidden states out: the layers only
    opt = torch.optim.AdamW(param_groups(model.parameters(), 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    h = torch.randn(batch, seq, cfg.hidden_size, device=device)
    ctx = model.step_context

    def step():
        ctx.at(0, 0)  # training-mode SR keys, as the trainer sets them
        with autocast_ctx(device, dtype):
            out = model(h)
        loss = out.float().pow(2).mean()
        loss.backward()
        ctx.at(None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = measure(step, warmup, repeat)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return ms, peak


def synchronises(fn, device: torch.device) -> bool:
    """Whether ``fn()`` waits for the GPU (torch's sync debug mode warns at each such call)."""
    if device.type != "cuda":
        return False
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return any("synchronizing" in str(w.message) for w in caught)


def num(v: float) -> str:
    """Whole numbers, but two significant digits below 10 (the interpreter's rates are far below 1)."""
    return f"{v:,.0f}" if v >= 10 else f"{v:.2g}"


def kernel_operands(recipes: list[str]) -> list[tuple[str, object, RHT]]:
    """(label, OperandQuant, the recipe's RHT) per distinct operand quantization of each FP4 recipe."""
    rows = []
    for name in recipes:
        r = Recipe.preset(name)
        roles: dict = {}
        for role, q in (("x", r.fprop.a), ("w", r.fprop.b), ("dy", r.dgrad.a)):
            if q.quantized:
                roles.setdefault(q, []).append(role)
        rows += [(f"{name}: {', '.join(rs)}", q, RHT(r.rht_size, r.rht_seed)) for q, rs in roles.items()]
    return rows


def bench_kernels(device, args, emit) -> None:
    """The quantizer kernels against a copy of their input (section 0 of the module docstring)."""
    shape = (64, 256) if args.small else (4096, 4096)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).to(torch.bfloat16)
    measure = make_timer(device, queue_ahead=True)
    repeat = 5 * args.repeat  # kernels are short: more samples for the same wall time
    in_bytes = x.numel() * x.element_size()
    reported: set[str] = set()

    def timed(what: str, fn) -> tuple[float, float, bool] | None:
        """(median ms, GB/s read + written, synchronises), or None when ``fn`` fails."""
        try:
            out = fn()
            nbytes = in_bytes + out.numel() * out.element_size()
            ms = measure(fn, args.warmup, repeat)
            return ms, nbytes / ms / 1e6, synchronises(fn, device)
        except Exception as e:  # one path failing (e.g. no TRITON_INTERPRET on a CPU) must not hide the others
            msg = f"{type(e).__name__}: {e}"
            if msg not in reported:  # the same cause would repeat in every row
                reported.add(msg)
                print(f"bench_gpu: quantizer {what} failed: {msg}", file=sys.stderr)
            return None

    copy = timed("copy", x.clone)
    copy_bw = copy[1] if copy else None

    def cell(r) -> str:
        if r is None:
            return "failed"
        ms, bw, sync = r
        pct = f", {num(100 * bw / copy_bw)}%" if copy_bw else ""
        return f"{ms:.3f} ms, {num(bw)} GB/s{pct}{' (sync)' if sync else ''}"

    where = ("" if device.type == "cuda" else
             " On the CPU these kernels run in the Triton interpreter: the numbers say nothing about a GPU.")
    emit(f"\n### Quantizer kernels: bf16 {tuple(shape)} in, dequantized operand out\n")
    emit(f"Each cell: median ms, GB/s (input + output bytes over the time), % of the copy's GB/s. Targets "
         f"(not asserted): triton >= 70% of the copy, RHT / no RHT <= 1.10x (the paper: 1.06x on Hopper). "
         f"triton and emulated write fp32, triton_bf16 bf16; the RHT size is the recipe's.{where}\n")
    emit("| recipe: operands | format | rounding | triton | triton + RHT | RHT / no RHT | triton_bf16 | emulated |")
    emit("|---|---|---|---|---|---|---|---|")
    emit(f"| copy | bf16, x.clone() | - | {cell(copy)} | - | - | - | - |")
    marked = copy is not None and copy[2]
    for label, q, rht in kernel_operands(args.recipes):
        def operand(rot):
            # the tensor amax (NVFP4) is computed once per tensor by the caller, outside the timed call
            amax = tensor_amax(x, q.fmt, rot) if q.fmt.scale == "e4m3" else None
            return Operand(x, q, rot, sr_key=SR_KEY if q.rounding == "sr" else None, tensor_amax=amax)

        def quantize(backend, op):
            return lambda: get_backend(backend).quantize(op)

        plain, rotated = operand(None), operand(rht)
        runs = [timed(f"{backend} {label}{' + RHT' if op is rotated else ''}", quantize(backend, op))
                for backend, op in (("triton", plain), ("triton", rotated), ("triton_bf16", plain),
                                    ("emulated", plain))]
        marked |= any(r is not None and r[2] for r in runs)
        ratio = f"{runs[1][0] / runs[0][0]:.2f}x" if runs[0] and runs[1] else "-"
        emit(f"| {label} | {q.fmt.describe()} | {q.rounding} | {cell(runs[0])} | RHT {rht.size}: {cell(runs[1])} | "
             f"{ratio} | {cell(runs[2])} | {cell(runs[3])} |")
    if marked:
        emit("\n(sync): the call synchronises the stream (a blocking host-to-device copy): its time includes "
             "the host's work after the sync.")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt_cell(ms: float, base: float | None) -> str:
    if ms != ms:
        return "failed"
    return f"{ms:.2f} ms ({ms / base:.2f}x)" if base else f"{ms:.2f} ms"


def header(device: torch.device, args) -> list[str]:
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return [f"**bench_gpu.py** on {name}, torch {torch.__version__}",
            "",
            f"dtype {args.dtype} (autocast) with fp32 master weights; fp32 matmul precision "
            f"{torch.get_float32_matmul_precision()}; backends {', '.join(args.backends)}; median of {args.repeat} "
            f"after {args.warmup} warm-up; ratios are against the bf16 recipe on the same inputs."]


def run(args) -> list[str]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_gpu: --device {args.device} but no CUDA GPU is visible "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the events and the sleep go to the current device's stream
    if device.type == "cpu" and args.small:
        torch.set_num_threads(1)  # tiny shapes: one thread is as fast and does not fight a shared machine
    measure = make_timer(device)
    recipes = args.recipes
    arms = [("bf16", "emulated")] + [(r, b) for r in recipes if r != "bf16" for b in args.backends]
    lines: list[str] = []

    def emit(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    for s in header(device, args):
        emit(s)

    if "triton" in args.backends:
        bench_kernels(device, args, emit)

    shapes = linear_shapes(args.small)
    emit("\n### QuantizedLinear forward + backward (tokens x in -> out)\n")
    emit("| recipe | backend | " + " | ".join(f"{label}, {t} tokens" for label, t, _, _ in shapes) + " |")
    emit("|---|---|" + "---|" * len(shapes))
    base: list[float | None] = [None] * len(shapes)
    for recipe, backend in arms:
        cells = []
        for i, (_, t, k, n) in enumerate(shapes):
            try:
                ms = bench_linear(device, recipe, backend, t, k, n, args.dtype, measure, args.warmup, args.repeat)
            except Exception as e:  # one arm failing (e.g. no triton for fused) must not hide the others
                print(f"bench_gpu: {recipe}/{backend} {k}->{n} failed: {type(e).__name__}: {e}", file=sys.stderr)
                ms = float("nan")
            if recipe == "bf16":
                base[i] = ms if ms == ms else None
            cells.append(fmt_cell(ms, None if recipe == "bf16" else base[i]))
        emit(f"| {recipe} | {'F.linear' if recipe == 'bf16' else backend} | " + " | ".join(cells) + " |")

    cfg = stack_config(args.small, args.layers)
    batch, seq = (2, 32) if args.small else (args.batch, args.seq)
    emit(f"\n### Training step of {args.layers} {PRESET}-width layers (hidden {cfg.hidden_size}, ffn "
         f"{cfg.ffn_hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} KV), {batch} x {seq} tokens, "
         f"fwd + bwd + AdamW\n")
    emit("| recipe | backend | step | tokens/s | peak memory |")
    emit("|---|---|---|---|---|")
    stack_base = None
    for recipe, backend in arms:
        try:
            ms, peak = bench_stack(device, recipe, backend, cfg, batch, seq, args.dtype, measure, args.warmup,
                                   args.repeat)
        except Exception as e:
            print(f"bench_gpu: layer stack {recipe}/{backend} failed: {type(e).__name__}: {e}", file=sys.stderr)
            ms, peak = float("nan"), None
        if recipe == "bf16":
            stack_base = ms if ms == ms else None
        tps = f"{batch * seq / (ms / 1e3):,.0f}" if ms == ms else "-"
        mem = f"{peak:.2f} GiB" if peak is not None else "-"
        emit(f"| {recipe} | {'F.linear' if recipe == 'bf16' else backend} | "
             f"{fmt_cell(ms, None if recipe == 'bf16' else stack_base)} | {tps} | {mem} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test in seconds)")
    ap.add_argument("--recipes", default=",".join(PRESETS), help="comma-separated presets (bf16 always runs)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated FP4 backends: emulated, fused, triton, triton_bf16 (default: "
                         "emulated,triton,triton_bf16 on CUDA with triton installed, else emulated)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype (default bf16)")
    ap.add_argument("--layers", type=int, default=2, help="layers in the training-step stack (default 2)")
    ap.add_argument("--batch", type=int, default=1, help="micro-batch of the stack (default 1)")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length of the stack (default 4096)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3; --small 1)")
    ap.add_argument("--repeat", type=int, default=None, help="timed iterations (default 10; --small 1)")
    ap.add_argument("--out", default=None, help="append the markdown to this file")
    args = ap.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in args.recipes if r not in PRESETS]
    if unknown:
        ap.error(f"unknown recipe {unknown[0]!r}; presets: {', '.join(PRESETS)}")
    if args.backends is None:
        cuda_triton = args.device.startswith("cuda") and importlib.util.find_spec("triton") is not None
        args.backends = "emulated,triton,triton_bf16" if cuda_triton else "emulated"
    args.backends = [b for b in args.backends.split(",") if b]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.small else 10)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    lines = run(args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
