"""Floating-point error-bound helpers shared by the numerical tests (Higham, Accuracy and
Stability of Numerical Algorithms, ch. 2-4): a tolerance is derived from these, never picked."""
from __future__ import annotations

U32 = 2.0 ** -24  # unit roundoff of fp32 (round to nearest)
U64 = 2.0 ** -53  # unit roundoff of fp64


def gamma(n: int, u: float = U32) -> float:
    """gamma_n = n u / (1 - n u): the relative bound of n successive roundings, e.g. any order
    of an n + 1 term sum is within gamma_n * sum |t| of the exact sum."""
    return n * u / (1 - n * u)
