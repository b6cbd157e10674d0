"""Compile the Triton quantizer kernels for a GPU target ahead of time, without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, what the CPU tests use) proves the kernels'
bits, but it accepts constructs the compiler rejects; only Triton's compiler proves that a
kernel exists for a GPU.  This module records the launches the backend's own launchers
(``triton_backend``) make for given operands, without running them, and compiles each
recorded configuration for a target (sm_90 Hopper, sm_100 Blackwell) with Triton's bundled
ptxas, reporting registers, spill bytes, shared memory and CTAs per SM.

Recording runs the real launchers on CPU tensors as if on a GPU: their tile sizes, constexprs,
argument types and launch options are exactly those a GPU run would use.  Argument types
follow Triton's JIT specialization of integers (a value of 1 is a compile-time constant, a
value beyond int32 is i64); its divisibility-by-16 hints are not applied (they only widen
loads).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import re
from dataclasses import dataclass
from unittest import mock

import torch

from . import triton_backend

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
           torch.int32: "i32", torch.uint8: "u8"}
TARGETS = {"sm_90": 90, "sm_100": 100}
# per-SM limits of both targets (H100 / B200): registers, threads, resident CTAs, shared memory
_SM_REGS, _SM_THREADS, _SM_CTAS, _SM_SMEM = 65536, 2048, 32, 228 * 1024


@dataclass(frozen=True)
class KernelConfig:
    """One compilable kernel configuration: what a launch fixes at compile time."""
    kernel: str
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    enable_fp_fusion: bool


@dataclass(frozen=True)
class CompileResult:
    """What ptxas reports for one configuration on one target (per thread, in bytes)."""
    config: KernelConfig
    target: str
    error: str | None = None
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def ctas_per_sm(self) -> int:
        threads = 32 * self.config.num_warps
        regs = -(-max(self.registers, 1) // 8) * 8  # allocated per warp in units of 256 registers
        limits = [_SM_REGS // (regs * threads), _SM_THREADS // threads, _SM_CTAS]
        if self.shared_bytes:
            limits.append(_SM_SMEM // self.shared_bytes)
        return max(0, min(limits))


class _KernelRecorder:
    def __init__(self, name: str, fn, out: list):
        self.name, self.fn, self.out = name, fn, out

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.out.append(_config(self.name, self.fn, args, kwargs))


class _KernelsRecorder:
    def __init__(self, kernels, out: list):
        self._kernels, self._out = kernels, out

    def __getattr__(self, name):
        return _KernelRecorder(name, getattr(self._kernels, name), self._out)


def _arg_type(value) -> tuple[str, object]:
    """(Triton signature type, constexpr value or None) of one runtime argument, as the JIT specializes it."""
    if value is None:
        return "constexpr", None
    if torch.is_tensor(value):
        return "*" + _DTYPES[value.dtype], None
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), None
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _is_constexpr(annotation) -> bool:
    return annotation in ("tl.constexpr", "constexpr") or getattr(annotation, "__name__", "") == "constexpr"


def _config(name: str, fn, args, kwargs) -> KernelConfig:
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    fusion = kwargs.pop("enable_fp_fusion", True)
    params = inspect.signature(fn.fn).parameters  # the Python function under @triton.jit (or the interpreter)
    bound = dict(zip(params, args))
    bound.update(kwargs)
    signature, constexprs = [], []
    for p in params.values():
        value = bound.get(p.name, None if p.default is inspect.Parameter.empty else p.default)
        if _is_constexpr(p.annotation):
            signature.append((p.name, "constexpr"))
            constexprs.append((p.name, value))
            continue
        kind, const = _arg_type(value)
        signature.append((p.name, kind))
        if kind == "constexpr":
            constexprs.append((p.name, const))
    return KernelConfig(name, tuple(signature), tuple(constexprs), num_warps, fusion)


_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1, "i32": 4, "i64": 8}


def traffic_bytes(config: KernelConfig) -> tuple[float, float]:
    """(bytes read, bytes written) per element of the operand by one launch of ``config``: the
    input, the dequantized values (one or, for the pair kernel, two outputs), packed codes
    (half a byte) and fp32 block scales.  Derived from the signature and constexprs, not
    measured; the SR index vectors (8 bytes per row and per column) and per-tensor scalars are
    left out (under 1 % for operands of 1K x 1K and more)."""
    sig, c = dict(config.signature), dict(config.constexprs)
    x = _BYTES[sig["x_ptr"].lstrip("*")]
    if config.kernel == "tensor_amax_kernel":
        return x, 0.0
    if config.kernel == "quantize_rowcol_kernel":
        return x, 2.0 * _BYTES[sig["row_ptr"].lstrip("*")]
    written = 0.0
    if c.get("VALUES", True) and sig["out_ptr"] != "constexpr":
        written += _BYTES[sig["out_ptr"].lstrip("*")]
    if c.get("PACKED", False):
        written += 0.5 + 4.0 / (c["QB"] * c["RB"])
    return x, written


@contextlib.contextmanager
def recording():
    """Within: the backend's launchers record each kernel launch (appended to the yielded
    list) instead of running it, and take CPU tensors as if they were on a GPU."""
    launches: list[KernelConfig] = []
    kernels = triton_backend._kernels()
    with mock.patch.object(triton_backend, "_kernels", lambda: _KernelsRecorder(kernels, launches)), \
            mock.patch.object(triton_backend, "interpreting", lambda: False), \
            mock.patch.object(triton_backend, "_check_device", lambda t: None):
        yield launches


_PTXAS_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                          r"Used (\d+) registers", re.S)


def compile_config(config: KernelConfig, target: str) -> CompileResult:
    """Compile one configuration for ``target`` ("sm_90" / "sm_100"); a failure is reported, not raised.

    Registers, spills and stack come from the ``ptxas -v`` log of Triton's own ptxas run (the
    compile is forced, never read from Triton's cache, so that the log exists)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(triton_backend._kernels(), config.kernel)
    if not hasattr(fn, "params"):
        raise RuntimeError("compile_config needs the kernels imported without TRITON_INTERPRET "
                           "(run tools/compile_kernels.py)")
    log = io.StringIO()
    try:
        with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v, printed
            triton.knobs.compilation.always_compile = True
            src = ASTSource(fn, dict(config.signature), dict(config.constexprs))
            compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32),
                                      options={"num_warps": config.num_warps,
                                               "enable_fp_fusion": config.enable_fp_fusion})
    except Exception as e:  # a compile error is this tool's finding: keep its last line
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return CompileResult(config, target, error=f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300])
    usage = _PTXAS_USAGE.search(log.getvalue())
    if usage is None:
        return CompileResult(config, target, error="no ptxas -v report in the compile log")
    stack, stores, loads, regs = (int(v) for v in usage.groups())
    return CompileResult(config, target, registers=regs, spill_stores=stores, spill_loads=loads, stack_bytes=stack,
                         shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0))


SUBSETS = ("full", "quick")
# formats the kernels serve, with the options that change a kernel's constexprs
FORMAT_CASES = {
    "int4": dict(fmt="int4"),
    "e2m1": dict(fmt="e2m1"),
    "nvfp4": dict(fmt="nvfp4"),
    "nvfp4_2d": dict(fmt="nvfp4", block_2d=True),
    "nvint4": dict(fmt="nvint4"),
    "mxfp4_floor": dict(fmt="mxfp4", scale_mode="floor"),
    "mxfp4_rceil": dict(fmt="mxfp4", scale_mode="rceil"),
}


def launcher_matrix(subset: str = "full", rows: int = 256, cols: int = 512) -> list[tuple[str, KernelConfig]]:
    """(label, configuration) of every distinct launch the launchers make for one operand shape,
    over format x rounding x RHT size x output dtype, plus packed (and codes without values, for
    the native GEMM's formats), pair (row + column from one read), grouped (groups along rows
    and along K), SR indices past 2^31 and NVFP4's tensor-amax pre-pass.
    ``subset``: "full"; "quick" (RHT sizes none and 16, fp32 output)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS} (got {subset!r})")
    full = subset == "full"
    from ..fp4.formats import make_format
    from ..fp4.grouped import Segments
    from ..fp4.hadamard import RHT
    from ..fp4.recipes import OperandQuant
    from ..fp4.sr_random import SRIndex
    from .backends import GroupedOperand, Operand

    x = torch.randn(rows, cols)
    out: dict[KernelConfig, str] = {}

    def record(label: str, run) -> None:
        with recording() as launches:
            run()
        for cfg in launches:
            out.setdefault(cfg, label)

    rht_sizes = (None, 16, 128) if full else (None, 16)
    dtypes = (torch.float32, torch.bfloat16) if full else (torch.float32,)
    for name, spec in FORMAT_CASES.items():
        spec = dict(spec)
        fmt = make_format(spec.pop("fmt"), **spec)
        for rounding in ("rtne", "sr"):
            quant = OperandQuant(fmt, rounding)
            key = 12345 if rounding == "sr" else None
            for n in rht_sizes:
                size = max(n, fmt.block) if n else None  # an RHT tile holds whole blocks
                rht = RHT(size, 0) if size else None
                op = Operand(x, quant, rht, sr_key=key)
                for dt in dtypes:
                    record(f"rows {name} {rounding} rht={size} {_DTYPES[dt]}",
                           lambda: triton_backend.quantize_operand(op, dt))
            rht = RHT(max(16, fmt.block), 0)
            op = Operand(x, quant, rht, sr_key=key)
            record(f"packed {name} {rounding}", lambda: triton_backend.quantize_packed(op))
            if fmt.grid == "e2m1" and fmt.scale in ("e4m3", "e8m0"):  # the native GEMM's codes-only pass
                record(f"codes {name} {rounding}", lambda: triton_backend.quantize_packed(op, values=False))
            col = Operand(x.t(), quant, rht, sr_key=key)
            record(f"pair {name} {rounding}", lambda: triton_backend.quantize_pair(op, col))
            if rounding == "sr" and name in ("int4", "nvfp4"):  # an operand whose SR indices pass 2^31
                far = SRIndex(row_offset=2 ** 31 // cols)
                wide, wide_col = Operand(x, quant, rht, key, far), Operand(x.t(), quant, rht, key, far)
                record(f"rows {name} sr wide", lambda: triton_backend.quantize_operand(wide))
                record(f"pair {name} sr wide", lambda: triton_backend.quantize_pair(wide, wide_col))
            if fmt.block_2d:
                continue  # 2-D blocks are for weights, which are not grouped by rows of tokens
            for axis, seg in ((0, Segments(0, (rows // 4, rows - rows // 4))),
                              (1, Segments(1, (cols // 4, cols - cols // 4)))):
                keys = (1, 2) if rounding == "sr" else None
                g = GroupedOperand(x, quant, seg, rht, sr_keys=keys)
                record(f"grouped axis={axis} {name} {rounding}",
                       lambda: triton_backend.quantize_grouped_operand(g))
    return [(label, cfg) for cfg, label in out.items()]
