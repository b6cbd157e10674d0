"""Layout-independent initialisation: each weight element is a pure function of
(init seed, the parameter's global name, the element's global index).

A sequential generator makes a weight depend on everything initialised before it and
on how the tensor is split, so a tensor-, pipeline- or expert-parallel rank would have to
build (or replay) the whole model to get its shard.  Here every element is drawn on its
own: a counter-based hash (the one stochastic rounding uses, fp4/sr_random.py) of its
global index under a key derived from the seed and the parameter's name gives two
uniforms, Box-Muller turns them into a normal in float64, and one rounding gives the
parameter's dtype.  Any shard of any parameter, built in any order on any layout,
therefore gets exactly the values the single-process model has at those positions.

Where a rank's tensor sits in the whole parameter comes from its ``Placement``
(model/placement.py: global shape, split dim, fused parts, number of shards, this shard).

Specification: docs/rht_and_sr.md.
"""
from __future__ import annotations

import hashlib
import math
import torch
from torch import nn

from ..fp4.compiled import compile_scope
from ..fp4.sr_random import derive_key, uniform_from_index
from .placement import Placement, placement_of

_ROWS_PER_CHUNK = 1 << 22  # elements per hashing chunk: bounds the int64/float64 temporaries


def name_key(seed: int, name: str) -> int:
    """A 62-bit integer of (seed, name), stable across processes (not Python's salted hash)."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def global_index(shape, spec: Placement, device, rows: slice | None = None) -> torch.Tensor:
    """int64 row-major index in the global tensor of every local element (of ``rows`` of dim 0)."""
    if len(spec.global_shape) != len(shape):
        raise ValueError(f"shard of shape {tuple(shape)} does not match global shape {spec.global_shape}")
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * spec.global_shape[d + 1]
    idx = torch.zeros((), dtype=torch.int64, device=device)
    for d, size in enumerate(shape):
        coords = spec.global_coords(d, size, device)
        if d == 0 and rows is not None:
            coords = coords[rows]
        view = [1] * len(shape)
        view[d] = coords.numel()
        idx = idx + (coords * strides[d]).view(view)
    return idx


def keyed_normal(key: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normals (float64), one per index, a pure function of (key, index)."""
    wide = bool(index.numel()) and int(index.max()) >= (1 << 31) - 1
    scale = 2.0 ** 24  # uniform_from_index returns k / 2^24: recover the integer k exactly
    # the three streams in one hash pass (keys broadcast over a leading dim): the same bits as
    # three calls, a third of the per-call overhead that dominates many small tensors
    keys = torch.tensor([derive_key(key, j) for j in range(3)], dtype=index.dtype, device=index.device)
    h1, h2, h3 = uniform_from_index(index, keys.view((3,) + (1,) * index.dim()), wide).double().mul_(scale).unbind(0)
    u1 = (h1.mul_(scale).add_(h2).add_(0.5)).mul_(2.0 ** -48)  # (0, 1) with 48 bits: tails to ~8 sigma
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * (h3 + 0.5) * 2.0 ** -24)


# -- the same values, fast: a compiled kernel for large chunks ------------------------------------------
_COMPILE_MIN = 1 << 17  # elements: below, eager ops cost less than a compiled kernel's call
# elements a KeyedInit fills: below, eager (~4.5M/s on 2 cores) finishes before the kernel's
# compile would (~6 s with a warm cache), so a small model never compiles it
COMPILE_WORTH = 1 << 25
_MARGIN = 2.0 ** -44  # relative: far above any two float64 implementations' gap on these values (~8 ulp)
_ROUNDED = (torch.float32, torch.bfloat16, torch.float16)  # float64 keeps every bit: eager only
_compiled = None  # torch.compile'd ``_narrow_values``, made at the first large chunk; False: unavailable


def _narrow_values(k1: int, k2: int, k3: int, index: torch.Tensor, std: torch.Tensor, dtype: torch.dtype):
    """``keyed_normal(...) * std`` for indices below 2^31 as one expression (for torch.compile),
    rounded to ``dtype``, and where the float64 value lies within ``_MARGIN`` of a float32
    rounding boundary (the elements another implementation of log / cos could round the
    other way)."""
    m = (1 << 31) - 1

    def mix(x):
        x = x ^ (x >> 16)
        x = (x * 0x2C1B3C6D) & m
        x = x ^ (x >> 15)
        x = (x * 0x297A2D39) & m
        return x ^ (x >> 16)

    h1, h2, h3 = ((mix(index ^ k) >> 7).double() for k in (k1, k2, k3))
    u1 = (h1 * 2.0 ** 24 + h2 + 0.5) * 2.0 ** -48
    v = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * (h3 + 0.5) * 2.0 ** -24) * std
    # float64 -> float32 -> dtype, as eager's casts round (bfloat16 / float16 from float64 go
    # through float32): only the float32 rounding can see the implementations' difference
    near = (v * (1 - _MARGIN)).to(torch.float32) != (v * (1 + _MARGIN)).to(torch.float32)
    return v.to(torch.float32).to(dtype), near


def keyed_values(key: int, index: torch.Tensor, std: float, dtype: torch.dtype, compiled: bool = False) -> torch.Tensor:
    """``(keyed_normal(key, index) * std).to(dtype)``, exactly; fast for large ``index`` when
    ``compiled`` (worth its compile: a large model's initialisation).

    With ``compiled``, a chunk of at least 2^17 elements below 2^31 runs one compiled kernel of the same formula
    (several times the eager ops' speed on a CPU).  Its float64 log / cos may differ from the
    eager ones in the last bits, so every element whose value lies within 2^-44 (relative) of
    a float32 rounding boundary -- about 2 per million -- is computed again by ``keyed_normal``
    (bfloat16 / float16 round from the float32 value, as eager's casts do): the result equals
    the eager one bit for bit, on every layout.  Where
    torch.compile cannot run (no C++ compiler), the eager ops give the same values, slower."""
    global _compiled
    n = index.numel()
    if (not compiled or n < _COMPILE_MIN or index.device.type != "cpu" or _compiled is False or dtype not in _ROUNDED
            or int(index.max()) >= (1 << 31) - 1):
        return (keyed_normal(key, index) * std).to(dtype)
    if _compiled is None:
        _compiled = torch.compile(_narrow_values, dynamic=True)
    k1, k2, k3 = (derive_key(key, j) for j in range(3))
    try:
        with compile_scope():  # on-disk cache entries keyed by the CPU target (fp4/compiled.py)
            out, near = _compiled(k1, k2, k3, index, torch.tensor(float(std), dtype=torch.float64), dtype)
    except Exception:  # no compiler here: the eager ops, the same values
        _compiled = False
        return (keyed_normal(key, index) * std).to(dtype)
    near = near.reshape(-1).nonzero().view(-1)
    if near.numel():
        out = out.contiguous()
        out.view(-1)[near] = (keyed_normal(key, index.reshape(-1)[near]) * std).to(dtype)
    return out


class KeyedInit:
    """Initialises parameters of ``root`` (a model or any part of it) by global name.

    Names are ``root``'s module paths, so build it on the object whose paths are the global
    names (a ``GPTModel`` or a pipeline chunk of one).  ``seed`` None draws one from torch's
    global generator (deterministic given ``torch.manual_seed``, as ``nn.init`` is).
    """

    def __init__(self, root: nn.Module, seed: int | None = None):
        self.seed = int(torch.randint(0, 2 ** 62, (1,), device="cpu")) if seed is None else int(seed)
        self._names = {id(m): n for n, m in root.named_modules()}
        self.compiled = sum(p.numel() for p in root.parameters()) >= COMPILE_WORTH  # see keyed_values

    def name_of(self, module: nn.Module, attr: str) -> str:
        prefix = self._names.get(id(module))
        if prefix is None:
            raise ValueError(f"KeyedInit: {type(module).__name__} is not part of the module it was built for")
        return f"{prefix}.{attr}" if prefix else attr

    @torch.no_grad()
    def normal_(self, module: nn.Module, attr: str = "weight", std: float = 1.0, name: str | None = None) -> None:
        """``module.<attr>`` <- N(0, std^2) at its global positions (``name``: key by another
        parameter's name, e.g. a tied copy)."""
        self.fill_normal(getattr(module, attr), placement_of(module, attr), name or self.name_of(module, attr), std)

    @torch.no_grad()
    def fill_normal(self, t: torch.Tensor, spec: Placement, name: str, std: float = 1.0) -> None:
        """``t`` (placed as ``spec``) <- N(0, std^2) keyed by the parameter name ``name``: one
        expert's slice of a stacked parameter under that expert's own name, for instance."""
        key = name_key(self.seed, name)
        per_row = max(1, t[0].numel() if t.dim() > 1 else 1)
        step = max(1, _ROWS_PER_CHUNK // per_row) if t.dim() > 1 else _ROWS_PER_CHUNK
        for start in range(0, t.shape[0], step):
            rows = slice(start, min(start + step, t.shape[0]))
            idx = global_index(t.shape, spec, t.device, rows)
            t[rows] = keyed_values(key, idx, std, t.dtype, self.compiled)

    @torch.no_grad()
    def fill_normal_stack(self, t: torch.Tensor, spec: Placement, names, std: float = 1.0) -> None:
        """Each ``t[j]`` (placed as ``spec``) <- N(0, std^2) keyed by ``names[j]``: a stack of
        experts, every slice what ``fill_normal`` gives it alone; a slice of one chunk shares
        one global index with the others (hundreds of small experts per layer)."""
        if t[0].numel() > _ROWS_PER_CHUNK:
            for j, name in enumerate(names):
                self.fill_normal(t[j], spec, name, std)
            return
        idx = global_index(t[0].shape, spec, t.device)
        for j, name in enumerate(names):
            t[j] = keyed_values(name_key(self.seed, name), idx, std, t.dtype, self.compiled)
