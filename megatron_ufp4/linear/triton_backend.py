"""The ``triton`` GEMM backends: one-pass Triton quantizers, cuBLAS GEMMs with FP32 accumulation.

``quantize`` reads each high-precision operand once and writes its dequantized FP4 values
once (linear/triton_kernels.py), bit for bit what the emulated backend computes for the same
``Operand``.  The multiply runs on the dequantized operands:

* ``triton`` (exact, the default): fp32 operands, fp32 GEMM with TF32 off.  Exact operands
  and the emulated backend's own GEMM, so losses match ``emulated`` on the same device.
* ``triton_bf16`` (fast): the dequantized values rounded once to bf16, a bf16 GEMM with FP32
  accumulation and output (the grouped expert GEMM: torch's bf16 grouped kernel, whose output
  is rounded to bf16 once more).  Exact where the dequantized value fits bf16's 8 significant
  bits: MXFP4 (an E2M1 value times a power of two).  A value times an FP32 block scale
  (e2m1 / int4 recipes, UFP4) or NVFP4's E4M3 x FP32 product generally does not fit, so each
  operand element carries one extra bf16 rounding (relative error <= 2^-9).

Needs triton and a CUDA device, or ``TRITON_INTERPRET=1`` (set before the first use) to run
the kernels on CPU tensors.  Anything else is a one-line error, never a fallback.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from typing import Sequence

import torch

from ..fp4.formats import FP4Format, nvfp4_tensor_factors
from ..fp4.grouped import GroupedIndex, check_segments, default_index, grouped_tensor_amax
from ..fp4.hadamard import RHT, rht_scale
from ..fp4.quantize import check_quantize_args, fake_quantize
from ..fp4.sr_random import SRIndex, needs_wide_index
from .backends import GroupedOperand, Operand, grouped_mm

_SCALE_KIND = {("fp32", "floor"): 0, ("fp32", "rceil"): 0, ("e4m3", "floor"): 1, ("e4m3", "rceil"): 1,
               ("e8m0", "floor"): 2, ("e8m0", "rceil"): 3}
PER_TENSOR, PER_ROW, PER_COL = 0, 1, 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    if importlib.util.find_spec("triton") is None:
        raise ValueError("gemm.backend=triton needs the triton package: pip install triton "
                         "(or pip install -e '.[gpu]')")
    from . import triton_kernels
    return triton_kernels


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tile(rows: int, cols: int, unit_k: int, unit_r: int, max_k: int = 128) -> tuple[int, int]:
    """Tile (BR, BK): powers of two, BK a multiple of the block and RHT tile along K (up to
    ``max_k`` where they allow), BR of the block height.  On a GPU 2K elements (16 x 128, 8 per
    thread of 8 warps: see ``_launch_options``), larger only where blocks and RHT tiles need
    it; a larger tile held twice the registers and spilled.  In the interpreter, where every
    program costs milliseconds, up to 32K elements so that a test shape is a handful of
    programs."""
    budget = 1 << 15 if interpreting() else 1 << 11
    bk = max(unit_k, min(_pow2_at_least(cols), max_k if not interpreting() else 512))
    br = max(unit_r, min(_pow2_at_least(rows), max(1, budget // bk)))
    return br, bk


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(f"the triton kernels need CUDA tensors (got a {t.device.type} tensor); on a CPU, set "
                     "TRITON_INTERPRET=1 before starting to run them in the Triton interpreter (slow: for tests)")


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it ``x``'s (a process on cuda:1 that never
    called set_device would otherwise launch on GPU 0 with pointers into GPU 1)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _int64(values, device) -> torch.Tensor:  # grouped operands only (their sizes come from the host)
    return torch.as_tensor(values, dtype=torch.int64, device=device).reshape(-1)


def _consts(fmt: FP4Format, rounding: str, rht: RHT | None, wide: bool = False, suffix: str = "") -> dict:
    """The kernel's compile-time description of one operand's quantization (``wide``: an SR
    index may reach 2^31, so the hash runs in int64)."""
    grid = fmt.grid_obj
    if not (grid.uniform or grid.name.startswith("e2m1")):
        raise ValueError(f"gemm.backend=triton: no kernel for the grid {grid.name!r}")
    n = rht.size if rht is not None else 1
    c = dict(QB=fmt.block, RB=fmt.block if fmt.block_2d else 1, SCALE=_SCALE_KIND[fmt.scale, fmt.scale_mode],
             GRID=0 if grid.uniform else 1, GMAX=float(grid.max), EMAX=math.frexp(grid.max)[1] - 1,
             SR=rounding == "sr", WIDE=rounding == "sr" and wide, N=n, LOG2N=int(math.log2(n)),
             RSCALE=rht_scale(n) if n > 1 else 1.0)
    return {k + suffix: v for k, v in c.items()}


def _pointers(x: torch.Tensor, fmt: FP4Format, rounding: str, rht: RHT | None, key, ridx, cidx, cstride,
              tensor_amax_) -> list[torch.Tensor]:
    """signs, key, row / column SR index terms, column stride, NVFP4 factors (dummies where unused)."""
    dev = x.device
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    fdummy = torch.zeros(1, dtype=torch.float32, device=dev)
    signs = rht.signs_on(dev) if rht is not None else fdummy
    bscale = gdec = fdummy
    if fmt.scale == "e4m3":
        bscale, gdec = nvfp4_tensor_factors(tensor_amax_, fmt.grid_obj.max)
        bscale, gdec = bscale.reshape(-1).contiguous(), gdec.reshape(-1).contiguous()
    if rounding != "sr":
        key = ridx = cidx = cstride = dummy
    return [signs, key, ridx, cidx, cstride, bscale, gdec]


def _launch_options(tile_elements: int) -> dict:
    """GPU launch options: no FMA contraction (it would change roundings) and a warp per 256
    elements of a tile (8 per thread), 4 to 16 warps: every configuration then fits in at most
    128 registers without spilling (tools/compile_kernels.py checks it for sm_90 and sm_100).
    The interpreter takes neither."""
    if interpreting():
        return {}
    return {"enable_fp_fusion": False, "num_warps": min(16, max(4, tile_elements // 256))}


def launch_quantize(x: torch.Tensor, fmt: FP4Format, rounding: str, rht: RHT | None, *,
                    key: torch.Tensor | None = None, key_mode: int = PER_TENSOR,
                    ridx: torch.Tensor | None = None, cidx: torch.Tensor | None = None,
                    cstride: torch.Tensor | None = None, stride_mode: int = PER_TENSOR,
                    tensor_amax_: torch.Tensor | None = None, par_mode: int = PER_TENSOR,
                    wide: bool = False, out_dtype: torch.dtype = torch.float32, packed: bool = False,
                    values: bool = True):
    """Dequantized FP4 values of a 2-D ``x`` blocked along its last dim, from one kernel.

    SR: element (r, c) draws at index ``ridx[r] * cstride + cidx[c]`` with ``key`` (each one
    value, per row or per column as the modes say; ``wide``: some index may reach 2^31).
    NVFP4: ``tensor_amax_`` (0-d, or per row / column) gives the two tensor factors.
    ``packed``: return (values, packed codes (R, K/2) uint8, the blocks' stored scales (fp32))
    from the same pass; ``values=False``: the values are not written (None in their place).
    """
    k = _kernels()
    _check_device(x)
    rows, cols = x.shape
    consts = _consts(fmt, rounding, rht, wide)
    br, bk = _tile(rows, cols, max(fmt.block, consts["N"]), consts["RB"])
    if not (values or packed):
        raise ValueError("launch_quantize: nothing to write (values=False without packed)")
    out = torch.empty((rows, cols), dtype=out_dtype, device=x.device) if values else None
    extra = {}
    if packed:
        extra = dict(codes_ptr=torch.empty((rows, cols // 2), dtype=torch.uint8, device=x.device),
                     scales_ptr=torch.empty((rows // consts["RB"], cols // fmt.block), device=x.device),
                     PACKED=True, VALUES=values)
    if x.numel():
        signs, *ptrs = _pointers(x, fmt, rounding, rht, key, ridx, cidx, cstride, tensor_amax_)
        with _on_device(x):
            k.quantize_rows_kernel[(-(-rows // br), -(-cols // bk))](
                x, out, rows, cols, x.stride(0), x.stride(1), signs, *ptrs, BR=br, BK=bk, **consts,
                KEY_MODE=key_mode, STRIDE_MODE=stride_mode, PAR_MODE=par_mode, OUT_BF16=out_dtype == torch.bfloat16,
                **extra, **_launch_options(br * bk))
    return (out, extra["codes_ptr"], extra["scales_ptr"]) if packed else out


def launch_tensor_amax(x: torch.Tensor, fmt: FP4Format, rht: RHT | None) -> torch.Tensor:
    """fp4.quantize.tensor_amax (fp32 0-d: after the RHT, over the finite blocks) in one read."""
    k = _kernels()
    _check_device(x)
    rows, cols = x.shape
    n = rht.size if rht is not None else 1
    unit_r = fmt.block if fmt.block_2d else 1
    br, bk = _tile(rows, cols, max(fmt.block, n), unit_r)
    launch = (-(-rows // br), -(-cols // bk))
    parts = torch.zeros(launch[0] * launch[1], dtype=torch.float32, device=x.device)
    if x.numel():
        signs = rht.signs_on(x.device) if rht is not None else parts
        with _on_device(x):
            k.tensor_amax_kernel[launch](x, parts, rows, cols, x.stride(0), x.stride(1), signs, BR=br, BK=bk,
                                         QB=fmt.block, RB=unit_r, N=n, LOG2N=int(math.log2(n)),
                                         RSCALE=rht_scale(n) if n > 1 else 1.0, **_launch_options(br * bk))
    return parts.amax() if parts.numel() else parts.new_zeros(())


def _operand_kwargs(op: Operand) -> dict:
    """An ``Operand``'s SR key / index terms and NVFP4 tensor amax as kernel inputs (one value each)."""
    q, x = op.quant, op.tensor
    if q.rounding == "sr" and op.sr_key is None:
        raise ValueError("a stochastically rounded operand needs its SR key (Operand.sr_key)")
    check_quantize_args(x, q.fmt, -1, q.rounding, op.rht, "propagate")
    if x.dim() != 2:
        raise ValueError(f"an Operand is 2-D (got shape {tuple(x.shape)})")
    rows, cols = x.shape
    dev = x.device
    kw = {}
    if q.rounding == "sr":
        index = op.sr_index or SRIndex()
        # device-side fills, not tensors from host lists: those would wait for the GPU on every call
        kw = dict(key=torch.full((1,), int(op.sr_key), dtype=torch.int64, device=dev),
                  ridx=torch.arange(index.row_offset, index.row_offset + rows, device=dev, dtype=torch.int64),
                  cidx=torch.arange(index.col_offset, index.col_offset + cols, device=dev, dtype=torch.int64),
                  cstride=torch.full((1,), int(index.row_stride or cols), dtype=torch.int64, device=dev),
                  wide=needs_wide_index(x.shape, index))
    if q.fmt.scale == "e4m3":
        amax = op.tensor_amax if op.tensor_amax is not None else launch_tensor_amax(x, q.fmt, op.rht)
        kw["tensor_amax_"] = amax.float().reshape(())
    return kw


def quantize_operand(op: Operand, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Operand`` → its GEMM-ready values (what ``EmulatedBackend.quantize`` returns, in ``out_dtype``)."""
    return launch_quantize(op.tensor, op.quant.fmt, op.quant.rounding, op.rht, out_dtype=out_dtype,
                           **_operand_kwargs(op))


def quantize_packed(op: Operand, out_dtype: torch.dtype = torch.float32, values: bool = True):
    """(GEMM-ready values, packed codes, scales, tensor scale) of ``op`` from one pass: the codes
    and scales of ``fp4.quantize(...)`` of the same operand, for FP4 all-gathers and exports
    (``.packed()``, ``.scales`` in its storage dtype, ``.tensor_scale``).  A block holding NaN/Inf
    stores a NaN scale (unspecified codes), so it decodes to NaN as its values do.
    ``values=False``: the values are neither written nor returned (None): a consumer of the
    codes alone (the native FP4 GEMM) writes 4.5 bits per element (NVFP4) instead of 36.5."""
    fmt = op.quant.fmt
    kw = _operand_kwargs(op)
    out, codes, stored = launch_quantize(op.tensor, fmt, op.quant.rounding, op.rht, out_dtype=out_dtype,
                                         packed=True, values=values, **kw)
    if fmt.scale == "e4m3":
        scales = stored.to(torch.float8_e4m3fn)  # exact: the kernel rounded them to E4M3 values
        tensor_scale = nvfp4_tensor_factors(kw["tensor_amax_"], fmt.grid_obj.max)[1]
    else:
        scales = stored.to(torch.uint8).view(torch.float8_e8m0fnu) if fmt.scale == "e8m0" else stored
        tensor_scale = None
    return out, codes, scales, tensor_scale


def is_transpose_of(t: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether ``t`` is ``src.t()`` (the same elements, strides swapped): one read serves both."""
    return (t.dim() == src.dim() == 2 and t.data_ptr() == src.data_ptr() and t.shape == src.shape[::-1]
            and t.stride() == src.stride()[::-1])


def quantize_pair(row: Operand, col: Operand, out_dtype: torch.dtype = torch.float32):
    """(quantize(row), quantize(col)) where ``col.tensor`` is ``row.tensor.t()``, from one read of it."""
    if not is_transpose_of(col.tensor, row.tensor):
        raise ValueError("quantize_pair: the column-wise operand must be the row-wise operand's transpose")
    k = _kernels()
    x = row.tensor
    _check_device(x)
    rows, cols = x.shape
    kw1, kw2 = _operand_kwargs(row), _operand_kwargs(col)
    f1, f2 = row.quant.fmt, col.quant.fmt
    c1 = _consts(f1, row.quant.rounding, row.rht, kw1.get("wide", False), "1")
    c2 = _consts(f2, col.quant.rounding, col.rht, kw2.get("wide", False), "2")
    # a tile holds whole blocks / RHT tiles of both operands: along K for operand 1, along R for 2
    # 64 columns: the transposed tile's stores are then 256-byte rows too
    br, bk = _tile(rows, cols, max(f1.block, c1["N1"], c2["RB2"]), max(f2.block, c2["N2"], c1["RB1"]), max_k=64)
    out_row = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
    out_col = torch.empty((cols, rows), dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out_row, out_col
    p1 = _pointers(x, f1, row.quant.rounding, row.rht, kw1.get("key"), kw1.get("ridx"), kw1.get("cidx"),
                   kw1.get("cstride"), kw1.get("tensor_amax_"))
    p2 = _pointers(x, f2, col.quant.rounding, col.rht, kw2.get("key"), kw2.get("ridx"), kw2.get("cidx"),
                   kw2.get("cstride"), kw2.get("tensor_amax_"))
    with _on_device(x):
        k.quantize_rowcol_kernel[(-(-rows // br), -(-cols // bk))](
            x, out_row, out_col, rows, cols, x.stride(0), x.stride(1), *p1, *p2, BR=br, BK=bk, **c1, **c2,
            OUT_BF16=out_dtype == torch.bfloat16, **_launch_options(br * bk))
    return out_row, out_col


def quantize_grouped_operand(op: GroupedOperand, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``GroupedOperand`` → one kernel for all groups (per-row / per-column keys, indices, amax)."""
    q, x, seg = op.quant, op.tensor, op.segments
    check_quantize_args(x, q.fmt, -1, q.rounding, op.rht, "propagate")
    check_segments(x, q.fmt, seg, op.rht)
    dev = x.device
    mode = PER_ROW if seg.axis == 0 else PER_COL
    kw = {}
    if q.rounding == "sr":
        keys = op.sr_keys
        if keys is None or len(keys) != len(seg.sizes) or any(k is None for k, s in zip(keys, seg.sizes) if s):
            raise ValueError("a stochastically rounded grouped operand needs one SR key per group")
        kt = _int64([0 if k is None else int(k) for k in keys], dev)
        index: GroupedIndex = op.sr_index if op.sr_index is not None else default_index(x.shape, seg, dev)
        per_col_stride = torch.is_tensor(index.stride)
        kw = dict(key=kt[seg.ids(dev)].contiguous(), key_mode=mode, ridx=_int64(index.rows, dev),
                  cidx=_int64(index.cols, dev),
                  cstride=_int64(index.stride if per_col_stride else [index.stride], dev),
                  stride_mode=PER_COL if per_col_stride else PER_TENSOR, wide=index.wide)
    if q.fmt.scale == "e4m3":
        amax = op.tensor_amax if op.tensor_amax is not None else grouped_tensor_amax(x, q.fmt, op.rht, seg)
        kw.update(tensor_amax_=amax.float()[seg.ids(dev)].contiguous(), par_mode=mode)
    return launch_quantize(x, q.fmt, q.rounding, op.rht, out_dtype=out_dtype, **kw)


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """TF32 off for this GEMM only (restored after), so an fp32 GEMM multiplies in fp32."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class TritonBackend:
    """Triton quantizers + cuBLAS; ``operand_dtype`` fp32 (exact, ``triton``) or bf16 (``triton_bf16``)."""

    def __init__(self, operand_dtype: torch.dtype = torch.float32):
        _kernels()  # a missing triton is reported when the backend is selected
        self.operand_dtype = operand_dtype
        self.name = "triton" if operand_dtype == torch.float32 else "triton_bf16"

    def check_device(self, device: torch.device) -> None:
        """Refuse, in one line, a device these kernels cannot run on (called once at setup)."""
        _check_device(torch.empty(0, device=device))

    def tensor_amax(self, x: torch.Tensor, fmt: FP4Format, rht: RHT | None) -> torch.Tensor:
        return launch_tensor_amax(x, fmt, rht)

    def quantize(self, op: Operand, stats: dict | None = None) -> torch.Tensor:
        out = quantize_operand(op, self.operand_dtype)
        if stats is not None:  # telemetry: the reference quantizer's statistics of the same values
            q = op.quant
            fake_quantize(op.tensor, q.fmt, -1, q.rounding, op.rht, tensor_amax=op.tensor_amax,
                          nonfinite="propagate", stats=stats, sr_index=op.sr_index, sr_key=op.sr_key)
        return out

    def quantize_pair(self, row: Operand, col: Operand) -> tuple[torch.Tensor, torch.Tensor]:
        if is_transpose_of(col.tensor, row.tensor):
            return quantize_pair(row, col, self.operand_dtype)
        return self.quantize(row), self.quantize(col)

    def matmul(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        if qa.dtype == torch.float32:
            with _ieee_fp32_matmul(qa.device):
                return qa @ qb.T
        if qa.is_cuda:
            return torch.mm(qa, qb.T, out_dtype=torch.float32)
        return qa.float() @ qb.float().T  # the interpreter on CPU: bf16 products are exact in fp32

    def gemm(self, a: Operand, b: Operand, stats: dict | None = None) -> torch.Tensor:
        sa = sb = None
        if stats is not None:
            sa, sb = stats.setdefault("a", {}), stats.setdefault("b", {})
        return self.matmul(self.quantize(a, sa), self.quantize(b, sb))

    def quantize_grouped(self, op: GroupedOperand) -> torch.Tensor:
        return quantize_grouped_operand(op, self.operand_dtype)

    def grouped_matmul(self, qa: torch.Tensor, qb: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        if qa.dtype == torch.bfloat16:
            # torch's grouped kernel (CUDA): bf16 in and out with FP32 accumulation, so the output
            # is rounded once to bf16 (relative <= 2^-9) before it widens to fp32
            return grouped_mm(qa, qb, sizes).float()
        with _ieee_fp32_matmul(qa.device):  # fp32: one cuBLAS GEMM per expert (the exact path)
            return grouped_mm(qa, qb, sizes)


__all__ = ["TritonBackend", "interpreting", "launch_quantize", "quantize_grouped_operand", "quantize_operand",
           "quantize_packed", "quantize_pair"]
