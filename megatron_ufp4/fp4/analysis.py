"""Shrinkage-bias analysis of the 4-bit formats (arXiv 2606.20381), measured with the real quantizer.

Everything here calls ``Grid.round_`` / ``quantize`` from this package; nothing is tabulated.

* per-level bias: E[round(t) - t | round(t) = q_i], analytic (2q_i - q_{i-1} - q_{i+1})/4 at
  interior levels, and empirical (Monte Carlo over t uniform on the grid's range).
* attenuation alpha = <Â, A> / ||A||², NMSE = ||Â - A||² / ||A||², SQNR = -10 log10 NMSE.
  With RHT, A is the rotated tensor T·A (the basis the FP4 GEMM multiplies in).
* ΔSQNR = 10 log10(NMSE_identity / NMSE_RHT): positive means the rotation helps.
* B_eff = exp(H) / K over the K = 8 magnitude buckets (codes & 7): 1 means every bucket is
  used equally often, 1/8 means a single bucket carries everything.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from .formats import FORMATS, make_format
from .grids import Grid, get_grid
from .hadamard import RHT
from .quantize import quantize

DISTRIBUTIONS = ("gaussian", "laplace", "student_t")
DEFAULT_FORMATS = ("e2m1", "int4", "nvfp4", "nvint4", "mxfp4")
BIAS_GRIDS = ("e2m1", "int4")
NUM_BUCKETS = 8  # magnitude codes 0..7; the sign bit is not a bucket


# -----------------------------------------------------------------------------
# per-level bias of a grid

def analytic_level_bias(grid: Grid) -> list[float | None]:
    """(2q_i - q_{i-1} - q_{i+1}) / 4 at interior levels; None at the two edge levels."""
    return [None if math.isnan(b) else b for b in grid.per_level_bias()]


def empirical_level_bias(grid: Grid, samples: int = 1_000_000, seed: int = 0) -> dict:
    """Monte Carlo E[|round(t)| - |t| | round(t) = ±q_i] with t ~ U(-max, max), RTNE.

    Errors are folded onto magnitudes (negative = shrinkage towards zero), since RTNE is odd-
    symmetric. Edge levels have no neighbour on one side, so their bias is not the interior
    formula: level 0 only sees values rounding *down*, the top level only values rounding *up*.
    """
    rng = np.random.default_rng(seed)
    t = torch.from_numpy(rng.uniform(-grid.max, grid.max, samples)).float()  # the quantizer takes fp32
    rounded = grid.round_(t.clone(), "rtne")
    level = (grid.encode(rounded) & 7).long()  # the grid's own code for each rounded value
    err = rounded.double().abs() - t.double().abs()
    count = torch.bincount(level, minlength=len(grid.levels)).double()
    total = torch.zeros(len(grid.levels), dtype=torch.float64).index_add_(0, level, err)
    total_sq = torch.zeros(len(grid.levels), dtype=torch.float64).index_add_(0, level, err * err)
    mean = total / count.clamp(min=1)
    var = (total_sq / count.clamp(min=1) - mean ** 2).clamp(min=0)
    stderr = (var / count.clamp(min=2)).sqrt()  # Monte Carlo standard error of each mean
    return {"mean": mean.tolist(), "stderr": stderr.tolist(), "count": count.long().tolist()}


def level_bias_table(grid: Grid | str, samples: int = 1_000_000, seed: int = 0) -> dict:
    grid = get_grid(grid) if isinstance(grid, str) else grid
    emp = empirical_level_bias(grid, samples, seed)
    return {"grid": grid.name, "levels": list(grid.levels), "analytic": analytic_level_bias(grid),
            "empirical": emp["mean"], "stderr": emp["stderr"], "count": emp["count"], "samples": samples}


# -----------------------------------------------------------------------------
# error metrics of one quantized tensor

def attenuation(deq: torch.Tensor, ref: torch.Tensor) -> float:
    """alpha = <Â, A>_F / ||A||_F² (float64): < 1 means the quantizer shrinks the signal."""
    ref64 = ref.double()
    return float((deq.double() * ref64).sum() / ref64.pow(2).sum())


def nmse(deq: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.double()
    return float((deq.double() - ref64).pow(2).sum() / ref64.pow(2).sum())


def sqnr_db(nmse_value: float) -> float:
    return math.inf if nmse_value == 0 else -10.0 * math.log10(nmse_value)


def effective_bucket_ratio(codes: torch.Tensor, num_buckets: int = NUM_BUCKETS) -> float:
    """exp(H) / K, H the entropy (nats) of the empirical use of the K magnitude buckets."""
    counts = torch.bincount((codes & 7).flatten().long(), minlength=num_buckets).double()
    p = counts[counts > 0] / counts.sum()
    return float(torch.exp(-(p * p.log()).sum()) / num_buckets)


def quantization_metrics(x: torch.Tensor, fmt, rht: RHT | None = None) -> dict:
    """alpha, NMSE, SQNR and B_eff of quantizing the 2-D ``x`` along its last axis (RTNE)."""
    qt = quantize(x, fmt, axis=-1, rounding="rtne", rht=rht)
    deq = qt.dequantize(rotated=True).double()  # Q(T·A): compared in the rotated basis, as the GEMM sees it
    ref = (rht.rotate(x) if rht is not None else x).double()
    err = nmse(deq, ref)
    return {"alpha": attenuation(deq, ref), "nmse": err, "sqnr_db": sqnr_db(err),
            "b_eff": effective_bucket_ratio(qt.codes)}


# -----------------------------------------------------------------------------
# input tensors

def make_tensor(dist: str, rows: int, cols: int, seed: int = 0, df: float = 3.0) -> torch.Tensor:
    """A seeded synthetic (rows, cols) fp32 tensor; blocks run along cols (the reduction axis)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be positive (got {rows}x{cols})")
    rng = np.random.default_rng(seed)
    if dist == "gaussian":
        x = rng.standard_normal((rows, cols))
    elif dist == "laplace":
        x = rng.laplace(size=(rows, cols))
    elif dist == "student_t":
        if not df > 0 or not math.isfinite(df):
            raise ValueError(f"student_t needs df > 0 (got {df})")
        x = rng.standard_t(df, size=(rows, cols))
    else:
        raise ValueError(f"unknown distribution {dist!r}; expected one of {DISTRIBUTIONS}")
    return torch.from_numpy(x).float()


def load_tensor(path: str, multiple: int = 32) -> torch.Tensor:
    """A tensor, or a dict of tensors, from a .pt file, as one 2-D fp32 tensor.

    Each tensor is flattened to rows of its last dimension, which must be a multiple of
    ``multiple`` (every block and RHT tile then lies inside a row, so the analysis is the same
    as on the original shape). Dict entries that are not floating-point tensors (step counters,
    ...) are skipped; if the last dimensions differ, rows are re-chunked to ``multiple`` wide.
    A dict is analyzed as one tensor (so NVFP4's per-tensor scale spans all of its entries).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except Exception as e:  # not a torch file, or pickled objects that weights_only refuses
        raise ValueError(f"cannot load {path}: {_load_error_reason(e)}") from None
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            raise ValueError(f"{path}: expected a floating-point tensor (got {obj.dtype})")
        named = {"tensor": obj}
    elif isinstance(obj, Mapping):
        named = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        if not named:
            raise ValueError(f"{path}: the dict holds no floating-point tensors")
    else:
        raise ValueError(f"{path}: expected a tensor or a dict of tensors (got {type(obj).__name__})")
    rows = []
    for name, t in named.items():
        if t.dim() == 0 or t.numel() == 0 or t.shape[-1] % multiple:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}; its last dimension must be a "
                             f"non-zero multiple of {multiple} (the block / RHT size)")
        rows.append(t.detach().float().reshape(-1, t.shape[-1]))
    if len({r.shape[-1] for r in rows}) > 1:
        rows = [r.reshape(-1, multiple) for r in rows]
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def _load_error_reason(e: Exception) -> str:
    """torch.load's weights_only errors open with a generic paragraph; keep the specific cause."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        cause = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return f"not a weights-only torch file ({' '.join(cause.split())})"
    return " ".join(text.split()) or type(e).__name__


def required_multiple(formats=DEFAULT_FORMATS, rht_size: int = 16) -> int:
    """The width every row must be a multiple of: the lcm of the formats' blocks and the RHT size."""
    m = rht_size
    for name in formats:
        m = math.lcm(m, make_format(name).block)
    return m


# -----------------------------------------------------------------------------
# the whole analysis

def analyze(tensor: torch.Tensor, formats=DEFAULT_FORMATS, rht_size: int = 16, seed: int = 0,
            bias_samples: int = 1_000_000) -> dict:
    """JSON-serialisable report: per-format metrics with and without RHT, and bias tables.

    ``seed`` seeds the RHT sign vector and the Monte Carlo draws of the bias tables.
    Non-finite values (SQNR of an exactly representable tensor) are reported as None.
    """
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise ValueError(f"unknown format(s) {unknown or formats}; expected some of {sorted(FORMATS)}")
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        raise ValueError("analyze expects a 2-D floating-point tensor (rows, cols)")
    multiple = required_multiple(formats, rht_size)
    if tensor.shape[1] % multiple:
        raise ValueError(f"cols ({tensor.shape[1]}) must be a multiple of {multiple} "
                         f"(the block sizes of {formats} and the RHT size {rht_size})")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("the tensor contains NaN or Inf")
    if not bool(tensor.any()):
        raise ValueError("the tensor is all zeros: NMSE and alpha are undefined")
    rht = RHT(rht_size, seed)

    per_format = {}
    for name in formats:
        plain = quantization_metrics(tensor, name)
        rotated = quantization_metrics(tensor, name, rht)
        delta = 10 * math.log10(plain["nmse"] / rotated["nmse"]) if plain["nmse"] > 0 and rotated["nmse"] > 0 else None
        per_format[name] = {"description": make_format(name).describe(), "identity": _finite(plain),
                            "rht": _finite(rotated), "delta_sqnr_db": delta}
    return {
        "shape": list(tensor.shape), "rht_size": rht_size, "seed": seed, "num_buckets": NUM_BUCKETS,
        "formats": per_format,
        "per_level_bias": {g: level_bias_table(g, bias_samples, seed) for g in BIAS_GRIDS},
    }


def _finite(metrics: dict) -> dict:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
