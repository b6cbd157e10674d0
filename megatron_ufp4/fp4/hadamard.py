"""Random Hadamard Transform (RHT) applied blockwise along one axis.

R = diag(signs) · H_n / sqrt(n), with H_n the Sylvester Hadamard matrix.  R is
orthogonal, so rotating both operands of a GEMM along its reduction axis cancels:
(X R)(W R)^T = X W^T.  The sign vector is drawn from a seed (same seed → same signs),
so every tensor-parallel rank can rebuild it and checkpoints can store it.

The rotation is *defined* as the fast Walsh-Hadamard butterfly, not a matmul: a matmul's
accumulation order differs between CPU BLAS, cuBLAS and a Triton ``tl.dot``, so the same
rotation would give other bits on every backend.  The butterfly's order is fixed (below),
so every backend that follows it (eager, torch.compile, the Triton kernels) gets the same
fp32 bits by construction.

Specification: docs/rht_and_sr.md.
"""
from __future__ import annotations

import functools
import math

import torch

RHT_SIZES = (16, 32, 64, 128)
# fp32(1/sqrt(n)) as Python floats, computed once (a constant for torch.compile'd callers)
_RHT_SCALES = {n: float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32)) for n in RHT_SIZES}


def sylvester_hadamard(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two (got {n})")
    h = torch.ones(1, 1, dtype=torch.float64, device="cpu")  # built on CPU whatever the default device
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of each tile of the last dim (``x @ H_n``, with
    n the last dim, a power of two) in the reference order: log2(n) stages, stage h = 1, 2,
    4, ... replacing each pair (a, b) = (x[j], x[j + h]) (j with bit h clear) by
    (a + b, a - b), one fp32 rounding per add.

    Two spellings of exactly these operations (tests/test_fp4_rht.py holds them bitwise equal):
    eager, one add and one subtract per stage over strided halves; under torch.compile, for
    n <= 32, every stage unrolled over the n columns, which inductor fuses into one kernel.
    """
    if x.shape[-1] <= 32 and torch.compiler.is_compiling():
        return _fwht_unrolled(x)
    return _fwht_stages(x)


def _fwht_stages(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    h = 1
    while h < n:
        pairs = x.reshape(-1, n // (2 * h), 2, h)
        out = torch.empty_like(pairs)
        torch.add(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 0])
        torch.sub(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 1])
        x = out.reshape(x.shape)
        h *= 2
    return x


def _fwht_unrolled(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    cols = list(x.unbind(-1))
    h = 1
    while h < n:
        for j in range(n):
            if not j & h:
                cols[j], cols[j + h] = cols[j] + cols[j + h], cols[j] - cols[j + h]
        h *= 2
    return torch.stack(cols, dim=-1)


def rht_scale(n: int) -> float:
    """The one final factor 1/sqrt(n), as the fp32 number every backend multiplies by."""
    return _RHT_SCALES[n]


def rotate_tiles(x: torch.Tensor, signs: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x R (or x R^T) on consecutive tiles of ``len(signs)`` elements of the last dim, fp32.

    Forward: flip signs, butterfly, multiply by ``rht_scale(n)``.  Inverse (R^T = H s / sqrt n):
    butterfly, scale, flip signs.  A sign flip is exact, so only the adds and the one scale
    round."""
    n = signs.shape[0]
    shape = x.shape
    t = x.float().reshape(-1, n)
    if not transpose:
        t = t * signs
    t = fwht(t) * rht_scale(n)
    if transpose:
        t = t * signs
    return t.reshape(shape)


@functools.lru_cache(maxsize=64)
def _random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, device="cpu").to(torch.float32).mul_(2).sub_(1)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The ±1 vector of (n, seed); a fresh copy of a cached one (a model builds thousands)."""
    return _random_signs(int(n), int(seed)).clone()


class RHT:
    """A seeded random Hadamard rotation of size ``n`` (16, 32, 64 or 128)."""

    def __init__(self, size: int = 16, seed: int = 0, signs: torch.Tensor | None = None):
        if size not in RHT_SIZES:
            raise ValueError(f"RHT size must be one of {RHT_SIZES} (got {size})")
        self.size, self.seed = size, int(seed)
        if signs is None:
            self.signs = random_signs(size, seed)
        else:
            self.signs = signs.detach().to(torch.float32).cpu()
            if self.signs.shape != (size,) or not bool(((self.signs == 1) | (self.signs == -1)).all()):
                raise ValueError(f"RHT signs must be a ±1 vector of length {size}")
        self._signs_on: dict[str, torch.Tensor] = {}

    def matrix64(self) -> torch.Tensor:
        """R in float64 (an independent reference for tests and analysis; not what rotates)."""
        return self.signs.double()[:, None] * sylvester_hadamard(self.size) / math.sqrt(self.size)

    def signs_on(self, device) -> torch.Tensor:
        """The fp32 sign vector on ``device`` (cached: used on every quantize call)."""
        key = str(device)
        if key not in self._signs_on:
            self._signs_on[key] = self.signs.to(device)
        return self._signs_on[key]

    def _apply(self, x: torch.Tensor, axis: int, transpose: bool) -> torch.Tensor:
        n = self.size
        if x.shape[axis] % n:
            raise ValueError(f"RHT of size {n} needs the rotated axis ({x.shape[axis]}) to be a multiple of {n}")
        xt = x.movedim(axis, -1).contiguous()
        return rotate_tiles(xt, self.signs_on(x.device), transpose).movedim(-1, axis)

    def rotate(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """x R along ``axis`` (fp32 result)."""
        return self._apply(x, axis, False)

    def unrotate(self, y: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """Exact inverse: y R^T along ``axis``."""
        return self._apply(y, axis, True)

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "signs": self.signs.clone()}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "RHT":
        return cls(int(sd["size"]), int(sd["seed"]), sd["signs"])

    def __eq__(self, other) -> bool:
        return isinstance(other, RHT) and self.size == other.size and torch.equal(self.signs, other.signs)

    def __repr__(self) -> str:
        return f"RHT(size={self.size}, seed={self.seed})"
