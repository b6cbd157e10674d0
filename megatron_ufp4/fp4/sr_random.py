"""Counter-based uniform draws for stochastic rounding.

``u = hash(key, global element index)``: the key comes from the caller's seeded
``torch.Generator`` (one small draw per quantized tensor, so the generator's state is what
checkpoints save), the index is the element's position in the *logical* tensor.  Because a
draw depends only on (key, position), a tensor-parallel shard that passes its offset gets
exactly the draws the unsplit tensor would — SR results do not depend on the split.  It is
also plain elementwise integer math, so the fused (compiled) quantizer folds it into the
same kernel instead of running a serial CPU generator.

All arithmetic stays in 31-bit values multiplied by 31-bit odd constants, every mixing step
a bijection on [0, 2^31).  In int64 the products stay below 2^62 (no overflow); when every
index is below 2^31 the same steps run on int32, where a product wraps modulo 2^32 (two's
complement, as CPU vector units and CUDA multiply) and the mask keeps its low 31 bits, which
are the int64 product's low 31 bits: the same draws at a third of the cost on a CPU.  That
wrap is undefined behaviour in C++, harmless in an eager kernel (one op per loop) but not in
compiled code that fuses the whole hash into one loop, so the fused quantizer passes int64.

Specification: docs/rht_and_sr.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_M31 = 0x7FFFFFFF


@dataclass(frozen=True)
class SRIndex:
    """Where a 2-D operand (rows, cols) sits in its logical tensor (for sharded operands)."""
    row_offset: int = 0
    col_offset: int = 0
    row_stride: int | None = None  # columns of the logical tensor (default: this tensor's)


def draw_key(generator: torch.Generator | None) -> int:
    """One 31-bit key from ``generator`` (the default CPU generator when None), drawn on the
    generator's own device whatever the default device is; a CPU draw needs no GPU sync."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, _M31, (1,), generator=generator, device=device))


def derive_key(*parts: int) -> int:
    """A 31-bit key that is a pure function of integers (module seed, step, micro-batch, ...)."""
    x = 0x1B873593
    for part in parts:
        for word in (int(part) & _M31, (int(part) >> 31) & _M31):
            x = _mix31_int(x ^ word)
    return x


def _mix31_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x2C1B3C6D) & _M31
    x ^= x >> 15
    x = (x * 0x297A2D39) & _M31
    return x ^ (x >> 16)


def _mix31(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & _M31
    x = x ^ (x >> 15)
    x = (x * 0x297A2D39) & _M31
    return x ^ (x >> 16)


def _rows_cols(shape) -> tuple[int, int]:
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows, shape[-1]


def element_index(shape, index: SRIndex | None, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Global index of every element of a tensor viewed as (rows, last dim); int32 only when
    every index is below 2^31 (``needs_wide_index`` is False)."""
    rows, cols = _rows_cols(shape)
    index = index or SRIndex()
    stride = index.row_stride or cols
    r = torch.arange(rows, device=device, dtype=dtype).add_(index.row_offset).mul_(stride)
    c = torch.arange(cols, device=device, dtype=dtype).add_(index.col_offset)
    return (r[:, None] + c[None, :]).reshape(shape)


def uniform_from_index(idx: torch.Tensor, key, wide: bool = True) -> torch.Tensor:
    """Uniform [0, 1) float32 with 24 random bits per element, a pure function of (idx, key).

    An index >= 2^31 mixes its high bits in with a second round; an index below 2^31 gets
    the one-round value whatever else is in the tensor, so a shard draws what the unsplit
    tensor draws at the same global index even when only the unsplit tensor reaches 2^31.
    ``wide=False`` promises every index is below 2^31 and skips the high-bit check; an int32
    ``idx`` (which makes that promise by its type) is hashed in int32 with the same result.
    """
    if idx.dtype == torch.int32:
        return (_mix31(idx ^ key) >> 7).to(torch.float32).mul_(2.0 ** -24)
    x = _mix31((idx & _M31) ^ key)
    if wide:
        hi = idx >> 31
        x = torch.where(hi == 0, x, _mix31(x ^ ((hi * 0x3C6EF35F + key) & _M31)))
    return (x >> 7).to(torch.float32).mul_(2.0 ** -24)


def needs_wide_index(shape, index: SRIndex | None) -> bool:
    rows, cols = _rows_cols(shape)
    index = index or SRIndex()
    last = (rows - 1 + index.row_offset) * (index.row_stride or cols) + cols - 1 + index.col_offset
    return last >= _M31
