"""The ``native`` GEMM backend: hardware FP4 tensor cores through ``torch._scaled_mm``.

For the formats the hardware multiplies itself -- E2M1 elements with E4M3 scales per 16
(NVFP4, 1-D or 16x16 weight blocks) or E8M0 scales per 32 (MXFP4) -- on GPUs with block-scaled
FP4 MMA (compute capability 10.x, ``torch.float4_e2m1fn_x2``).  ``quantize`` runs the Triton
quantizer's packed output (the codes and scales ``fp4.quantize`` would store, RHT and SR
included), ``matmul`` hands them to cuBLAS with the scales in its 128 x 4 tiled layout, and
multiplies NVFP4's two tensor scales into the FP32 result.

Not bitwise ``emulated``: the products are the same exact values, but the tensor cores
accumulate in their own order, and the reference rounds each dequantized operand to fp32
first.  Formats without a native GEMM (the uniform grid of UFP4, E2M1 with plain FP32
scales, range-restricted E2M1) are refused in one line, as are grouped (MoE expert) GEMMs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..fp4.formats import FP4Format
from ..fp4.hadamard import RHT
from .backends import GroupedOperand, Operand


@dataclass
class NativeOperand:
    """What the FP4 tensor cores consume: packed E2M1 codes (rows, K/2), per-(row, block) scales
    (rows, K/block) in float8, and NVFP4's fp32 tensor scale (None for MXFP4)."""
    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    block: int


def native_format_problem(fmt: FP4Format) -> str | None:
    """Why ``fmt`` has no native FP4 GEMM, or None when it has one."""
    if fmt.grid != "e2m1" or fmt.max_level not in (None, 6):
        return f"format {fmt.name} ({fmt.describe()}) is not plain E2M1"
    if (fmt.scale, fmt.block) not in (("e4m3", 16), ("e8m0", 32)):
        return f"format {fmt.name} ({fmt.describe()}) has no hardware block scale (E4M3/16 or E8M0/32)"
    return None


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """(rows, cols) block scales -> cuBLAS's block-scaling layout, flattened: zero-padded to
    128-row x 4-column tiles, tiles in row-major order, and inside a tile the scale of
    (row r, column c) at offset (r % 32) * 16 + (r // 32) * 4 + c."""
    rows, cols = scales.shape
    raw = scales.view(torch.uint8)  # float8 dtypes lack some factories: move bytes
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = raw
    if (pr, pc) != (rows, cols):
        padded = raw.new_zeros((pr, pc))
        padded[:rows, :cols] = raw
    tiles = padded.view(pr // 128, 4, 32, pc // 4, 4)  # (tile row, r // 32, r % 32, tile col, c)
    return tiles.permute(0, 3, 2, 1, 4).reshape(-1).view(scales.dtype)  # (tile row, tile col, r % 32, r // 32, c)


def pad_reduction(codes: torch.Tensor, scales: torch.Tensor, block: int, multiple: int = 32):
    """Packed codes (rows, K/2) and their block scales (rows, K/block), zero-padded along K to a
    multiple of ``multiple`` elements: the FP4 ``_scaled_mm`` needs K % 32 == 0, but an NVFP4
    operand is only padded to its 16-element block (a Wgrad over 16 mod 32 tokens).  A zero code
    is +0 and a zero scale decodes its block to 0, so the product is unchanged."""
    pad = (-codes.shape[1] * 2) % multiple
    if not pad:
        return codes, scales
    codes = torch.nn.functional.pad(codes, (0, pad // 2))
    raw = torch.nn.functional.pad(scales.view(torch.uint8), (0, pad // block))  # float8: pad as bytes
    return codes, raw.view(scales.dtype)


class NativeBackend:
    name = "native"

    def __init__(self):
        from .triton_backend import _kernels
        _kernels()  # the quantizer is the Triton one
        if not hasattr(torch, "float4_e2m1fn_x2"):
            raise ValueError(f"gemm.backend=native needs torch.float4_e2m1fn_x2 (torch {torch.__version__} lacks it)")

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"the native FP4 GEMM needs a CUDA GPU with FP4 tensor cores (got {device})")
        cap = torch.cuda.get_device_capability(device)
        if cap[0] != 10:
            raise ValueError(f"the native FP4 GEMM needs compute capability 10.x (block-scaled FP4 MMA); "
                             f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: use gemm.backend=triton")

    def tensor_amax(self, x: torch.Tensor, fmt: FP4Format, rht: RHT | None) -> torch.Tensor:
        from .triton_backend import launch_tensor_amax
        return launch_tensor_amax(x, fmt, rht)

    def quantize(self, op: Operand, stats: dict | None = None) -> NativeOperand:
        from .triton_backend import quantize_packed
        problem = native_format_problem(op.quant.fmt)
        if problem:
            raise ValueError(f"gemm.backend=native: {problem}; use gemm.backend=triton")
        if stats is not None:
            raise ValueError("gemm.backend=native does not collect quantization statistics; use triton")
        fmt = op.quant.fmt
        _, codes, scales, tensor_scale = quantize_packed(op, values=False)  # codes and scales only
        if fmt.block_2d:  # a 16x16 block's scale serves each of its 16 rows
            scales = scales.repeat_interleave(fmt.block, dim=0)
        codes, scales = pad_reduction(codes, scales, fmt.block)
        return NativeOperand(codes, scales, tensor_scale, fmt.block)

    def matmul(self, qa: NativeOperand, qb: NativeOperand) -> torch.Tensor:
        a = qa.codes.view(torch.float4_e2m1fn_x2)
        b = qb.codes.view(torch.float4_e2m1fn_x2)
        out = torch._scaled_mm(a, b.t(), swizzle_scales(qa.scales), swizzle_scales(qb.scales),
                               out_dtype=torch.float32)
        if qa.tensor_scale is not None:  # NVFP4: each operand's decode factor, one at a time (their
            out = out * qa.tensor_scale * qb.tensor_scale  # product alone can underflow fp32)
        return out

    def gemm(self, a: Operand, b: Operand, stats: dict | None = None) -> torch.Tensor:
        return self.matmul(self.quantize(a, stats), self.quantize(b, stats))

    def quantize_pair(self, row: Operand, col: Operand):
        return self.quantize(row), self.quantize(col)

    def quantize_grouped(self, op: GroupedOperand):
        raise ValueError("gemm.backend=native has no grouped (MoE expert) FP4 GEMM yet; use gemm.backend=triton")

    def grouped_matmul(self, qa, qb, sizes: Sequence[int]) -> torch.Tensor:
        raise ValueError("gemm.backend=native has no grouped (MoE expert) FP4 GEMM yet; use gemm.backend=triton")


__all__ = ["NativeBackend", "NativeOperand", "native_format_problem", "pad_reduction", "swizzle_scales"]
