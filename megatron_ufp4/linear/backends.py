"""Pluggable FP4 GEMM backends.

Every backend computes one thing: ``A @ B^T`` with A (M, K) and B (N, K) each quantized
in blocks along K as a ``GemmQuant`` says, accumulating in FP32.  The quantized linear
expresses its three GEMMs in that form, so a backend never needs to know which one it
runs.  Backends register by name; ``get_backend`` fails loudly on unknown or
unavailable ones instead of silently running something else.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..fp4.hadamard import RHT
from ..fp4.quantize import fake_quantize
from ..fp4.recipes import GemmQuant, OperandQuant
from ..fp4.sr_random import SRIndex


class GemmBackend(Protocol):
    name: str

    def gemm(self, a: torch.Tensor, b: torch.Tensor, spec: GemmQuant, rht: RHT | None,
             generator: torch.Generator | None, stats: dict | None = None,
             amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             sr_index: tuple[SRIndex | None, SRIndex | None] = (None, None),
             sr_keys: tuple[int | None, int | None] = (None, None)) -> torch.Tensor:
        """A @ B^T; amax_reduce: all-reduce(max) for NVFP4 tensor amaxes of sharded operands;
        sr_index: where A and B sit in their logical (unsharded) tensors, for SR draws;
        sr_keys: SR keys to use (None: draw one from ``generator``)."""
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


def _pad_reduction(a: torch.Tensor, b: torch.Tensor, multiple: int):
    """Zero-pad K (e.g. the token axis of Wgrad) up to a multiple; zeros add nothing to A @ B^T."""
    k = a.shape[-1]
    pad = (-k) % multiple
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
        b = torch.nn.functional.pad(b, (0, pad))
    return a, b


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

    def _operand(self, t, op: OperandQuant, rht, generator, stats, amax_reduce, sr_index, sr_key):
        tensor_amax = None
        if op.fmt.scale == "e4m3" and amax_reduce is not None:
            src = rht.rotate(t) if rht is not None else t
            tensor_amax = amax_reduce(src.abs().amax().float())
        return fake_quantize(t, op.fmt, -1, op.rounding, rht, generator,
                             tensor_amax=tensor_amax, nonfinite="propagate", stats=stats, fused=self.fused,
                             sr_index=sr_index, sr_key=sr_key)

    def gemm(self, a, b, spec, rht, generator, stats=None, amax_reduce=None, sr_index=(None, None),
             sr_keys=(None, None)):
        rht = rht if spec.rht else None
        multiple = max(spec.a.fmt.block, spec.b.fmt.block, rht.size if rht is not None else 1)
        a, b = _pad_reduction(a, b, multiple)
        sa = sb = None
        if stats is not None:
            sa, sb = stats.setdefault("a", {}), stats.setdefault("b", {})
        qa = self._operand(a, spec.a, rht, generator, sa, amax_reduce, sr_index[0], sr_keys[0])
        qb = self._operand(b, spec.b, rht, generator, sb, amax_reduce, sr_index[1], sr_keys[1])
        return qa @ qb.T


register_backend("emulated", EmulatedBackend)
register_backend("fused", lambda: EmulatedBackend(fused=True))
