"""Random Hadamard Transform (RHT) applied blockwise along one axis.

R = diag(signs) · H_n / sqrt(n), with H_n the Sylvester Hadamard matrix.  R is
orthogonal, so rotating both operands of a GEMM along its reduction axis cancels:
(X R)(W R)^T = X W^T.  The sign vector is drawn from a seed (same seed → same signs),
so every tensor-parallel rank can rebuild it and checkpoints can store it.

Specification: docs/rht_and_sr.md.
"""
from __future__ import annotations

import math

import torch

RHT_SIZES = (16, 32, 64, 128)


def sylvester_hadamard(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two (got {n})")
    h = torch.ones(1, 1, dtype=torch.float64, device="cpu")  # built on CPU whatever the default device
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g, device="cpu").to(torch.float32).mul_(2).sub_(1)


class RHT:
    """A seeded random Hadamard rotation of size ``n`` (16, 32, 64 or 128)."""

    def __init__(self, size: int = 16, seed: int = 0, signs: torch.Tensor | None = None):
        if size not in RHT_SIZES:
            raise ValueError(f"RHT size must be one of {RHT_SIZES} (got {size})")
        self.size, self.seed = size, int(seed)
        self.signs = random_signs(size, seed) if signs is None else signs.detach().to(torch.float32).cpu()
        if self.signs.shape != (size,) or not bool(((self.signs == 1) | (self.signs == -1)).all()):
            raise ValueError(f"RHT signs must be a ±1 vector of length {size}")
        m = self.signs.double()[:, None] * sylvester_hadamard(size) / math.sqrt(size)
        self._matrix64 = m
        self._cache: dict[tuple[str, bool], torch.Tensor] = {}

    def matrix(self, device="cpu", transpose: bool = False) -> torch.Tensor:
        key = (str(device), transpose)
        if key not in self._cache:
            m = self._matrix64.T if transpose else self._matrix64
            self._cache[key] = m.to(device=device, dtype=torch.float32).contiguous()
        return self._cache[key]

    def _apply(self, x: torch.Tensor, axis: int, transpose: bool) -> torch.Tensor:
        n = self.size
        if x.shape[axis] % n:
            raise ValueError(f"RHT of size {n} needs the rotated axis ({x.shape[axis]}) to be a multiple of {n}")
        xt = x.movedim(axis, -1).float()
        shape = xt.shape
        y = xt.contiguous().view(-1, n) @ self.matrix(x.device, transpose)
        return y.reshape(shape).movedim(-1, axis)

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
