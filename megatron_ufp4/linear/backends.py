"""Pluggable FP4 GEMM backends and the narrow contract they implement.

A backend computes ``A @ B^T`` in FP32 for two ``Operand``s, each a 2-D tensor blocked
along its last dim (K) plus everything needed to quantize it without looking anywhere
else: its ``OperandQuant`` (format, block, rounding), the RHT or None, its SR key and the
global offset of its elements (``SRIndex``: a tensor-parallel shard draws the unsplit
tensor's noise), and, for two-level-scaled formats (NVFP4), its tensor amax.  Keys, amaxes
and padding are decided by the caller (``linear/gemm.py``), once, for single-process and
parallel layers alike; a backend never draws randomness or talks to other ranks.

The contract is two steps, so a faster backend can replace either:

    quantize(operand) -> GEMM-ready tensor (the emulated backend: dequantized fp32 values)
    matmul(qa, qb)    -> qa @ qb^T in FP32
    gemm(a, b)        =  matmul(quantize(a), quantize(b))

Backends register by name; ``get_backend`` fails loudly on unknown or unavailable ones
instead of silently running something else.

Specification: docs/backends.md.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from ..fp4.grouped import GroupedIndex, Segments, fake_quantize_grouped
from ..fp4.hadamard import RHT
from ..fp4.formats import FP4Format
from ..fp4.quantize import fake_quantize, tensor_amax
from ..fp4.recipes import OperandQuant
from ..fp4.sr_random import SRIndex


@dataclass(frozen=True)
class Operand:
    """One quantized GEMM operand: ``tensor`` (rows, K) blocked along K."""
    tensor: torch.Tensor
    quant: OperandQuant
    rht: RHT | None = None
    sr_key: int | None = None  # required when quant.rounding == "sr"
    sr_index: SRIndex | None = None  # where these elements sit in the logical (unsharded) tensor
    tensor_amax: torch.Tensor | None = None  # fp32 0-d; required for formats with a tensor scale

    def part(self, rows: slice | None = None, cols: slice | None = None, sr_index: SRIndex | None = None) -> "Operand":
        """A sub-block of this operand (same key and tensor amax) that sits at ``sr_index``."""
        t = self.tensor
        if rows is not None:
            t = t[rows]
        if cols is not None:
            t = t[:, cols]
        return dataclasses.replace(self, tensor=t, sr_index=sr_index)


@dataclass(frozen=True)
class GroupedOperand:
    """G operands side by side in one ``tensor`` (rows, K) along ``segments.axis`` (see
    fp4/grouped.py), each with what an ``Operand`` has: key, global SR indices, tensor amax."""
    tensor: torch.Tensor
    quant: OperandQuant
    segments: Segments
    rht: RHT | None = None
    sr_keys: tuple[int | None, ...] | None = None  # one per group; required when quant.rounding == "sr"
    sr_index: GroupedIndex | None = None  # global SR index of every element (factored)
    tensor_amax: torch.Tensor | None = None  # fp32 (G,); required for formats with a tensor scale


def grouped_kernel_takes(device_type: str, a_dtype: torch.dtype, b_dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs a grouped kernel for these operands.  On CUDA (torch
    2.13) only bf16 x bf16 with a bf16 output does; anything else goes to its fallback, which
    copies the offsets to the host (a sync) and loops over groups, so we loop ourselves on the
    sizes we already hold.  On CPU it takes fp32 / bf16 / fp16 (bitwise the per-group ``mm``)."""
    if device_type == "cuda":
        return a_dtype == b_dtype == torch.bfloat16
    return a_dtype == b_dtype and a_dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Per-group ``a_g @ b_g^T`` as one grouped GEMM.

    ``b`` 3-D (G, N, K): ``a`` (T, K) is G row groups of ``sizes``; returns (T, N).
    ``b`` 2-D (N, sum K): ``a`` (M, sum K) and ``b`` are G groups of ``sizes`` along K;
    returns (G, M, N) (zeros for an empty group).  The result has the operands' dtype.
    ``torch._grouped_mm`` where it runs a grouped kernel (``grouped_kernel_takes``; on CPU
    also 16-byte aligned strides), else one ``mm`` per group.  Needs ``sizes`` on the host
    (the caller's one sync per MoE layer call).
    """
    starts = [e - n for e, n in zip(itertools.accumulate(sizes), sizes)]
    if (a.shape[0] and (b.dim() == 2 or a.shape[1]) and sum(sizes)
            and grouped_kernel_takes(a.device.type, a.dtype, b.dtype)):
        offs = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32, device=a.device)
        try:
            return torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
        except torch.OutOfMemoryError:  # a real failure, not operands the kernel refuses
            raise
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # e.g. unaligned strides
    if b.dim() == 3:
        return torch.cat([a[s:s + n] @ b[g].T for g, (s, n) in enumerate(zip(starts, sizes))]
                         or [a.new_zeros((0, b.shape[1]))])
    return torch.stack([a[:, s:s + n] @ b[:, s:s + n].T for s, n in zip(starts, sizes)])


class GemmBackend(Protocol):
    name: str

    def quantize(self, op: Operand, stats: dict | None = None) -> torch.Tensor:
        """The GEMM-ready form of ``op`` (``stats``: optional telemetry dict to fill)."""
        ...

    def matmul(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        """qa @ qb^T with FP32 accumulation and result."""
        ...

    def gemm(self, a: Operand, b: Operand, stats: dict | None = None) -> torch.Tensor:
        """Must equal ``matmul(quantize(a), quantize(b))``: callers may run either."""
        ...

    def quantize_pair(self, row: Operand, col: Operand) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantize(row), quantize(col)) for two uses of one tensor, ``col.tensor`` being
        ``row.tensor.t()`` (dY: Dgrad's A and Wgrad's A): a kernel may read it once."""
        ...

    def quantize_grouped(self, op: GroupedOperand) -> torch.Tensor:
        """One call for all groups; each group's values are those of ``quantize`` of it alone."""
        ...

    def grouped_matmul(self, qa: torch.Tensor, qb: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Per-group qa_g @ qb_g^T in FP32 (layouts as ``grouped_mm``)."""
        ...

    def check_device(self, device: torch.device) -> None:
        """Raise ValueError (one line, what is missing) when this backend cannot run on ``device``."""
        ...

    def tensor_amax(self, x: torch.Tensor, fmt: FP4Format, rht: RHT | None) -> torch.Tensor:
        """fp32 0-d ``fp4.quantize.tensor_amax`` of a 2-D operand (NVFP4's pre-pass), exactly."""
        ...


_REGISTRY: dict[str, Callable[[], GemmBackend]] = {}
_INSTANCES: dict[str, GemmBackend] = {}


def register_backend(name: str, factory: Callable[[], GemmBackend]) -> None:
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> GemmBackend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown FP4 GEMM backend {name!r}; registered: {available_backends()}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()  # a factory may raise ImportError with install advice
    return _INSTANCES[name]


class EmulatedBackend:
    """Pure-torch reference: quantize-dequantize both operands, multiply in FP32.

    Runs anywhere torch runs (CPU, CUDA without FP4 tensor cores).  Its numbers are the
    definition the faster backends are tested against.  ``fused=True`` ("fused" backend)
    runs the same quantizer through torch.compile: identical bits, fewer memory passes,
    a one-off compile per operand kind.
    """

    def __init__(self, fused: bool = False):
        self.fused = fused
        self.name = "fused" if fused else "emulated"

    def quantize(self, op: Operand, stats: dict | None = None) -> torch.Tensor:
        q = op.quant
        if q.rounding == "sr" and op.sr_key is None:
            raise ValueError("a stochastically rounded operand needs its SR key (Operand.sr_key)")
        return fake_quantize(op.tensor, q.fmt, -1, q.rounding, op.rht, tensor_amax=op.tensor_amax,
                             nonfinite="propagate", stats=stats, fused=self.fused, sr_index=op.sr_index,
                             sr_key=op.sr_key)

    def matmul(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        return qa @ qb.T

    def gemm(self, a: Operand, b: Operand, stats: dict | None = None) -> torch.Tensor:
        sa = sb = None
        if stats is not None:
            sa, sb = stats.setdefault("a", {}), stats.setdefault("b", {})
        return self.matmul(self.quantize(a, sa), self.quantize(b, sb))

    def quantize_pair(self, row: Operand, col: Operand) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(row), self.quantize(col)

    def quantize_grouped(self, op: GroupedOperand) -> torch.Tensor:
        q = op.quant
        return fake_quantize_grouped(op.tensor, q.fmt, op.segments, q.rounding, op.rht, keys=op.sr_keys,
                                     index=op.sr_index, tensor_amax=op.tensor_amax, fused=self.fused)

    def grouped_matmul(self, qa: torch.Tensor, qb: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return grouped_mm(qa, qb, sizes)

    def check_device(self, device: torch.device) -> None:
        """Pure torch: any device torch runs on; ``fused`` also needs a compiler for it."""
        if self.fused:
            from ..fp4.compiled import check_compiler
            check_compiler(device)

    def tensor_amax(self, x: torch.Tensor, fmt: FP4Format, rht: RHT | None) -> torch.Tensor:
        return tensor_amax(x, fmt, rht)


def _triton(operand_dtype: torch.dtype) -> GemmBackend:
    from .triton_backend import TritonBackend  # imports triton only when selected
    return TritonBackend(operand_dtype)


def _native() -> GemmBackend:
    from .native_backend import NativeBackend  # FP4 tensor cores (compute capability 10.x)
    return NativeBackend()


register_backend("emulated", EmulatedBackend)
register_backend("fused", lambda: EmulatedBackend(fused=True))
register_backend("triton", lambda: _triton(torch.float32))
register_backend("triton_bf16", lambda: _triton(torch.bfloat16))
register_backend("native", lambda: _native())
