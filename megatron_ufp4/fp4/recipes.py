"""Training recipes as data: how each operand of each of the three GEMMs is quantized.

A linear y = x W^T runs three GEMMs, each quantizing its two operands along its own
reduction axis:

    fprop  Y  = X  · W^T   operands (x, w)    reduce over in_features
    dgrad  dX = dY · W     operands (dy, w)   reduce over out_features
    wgrad  dW = dY^T · X   operands (dy, x)   reduce over tokens

A recipe is a plain dict (``PRESETS`` below, or YAML) interpreted by ``Recipe.from_dict``:

    name: preset to start from (its keys are overridden by the ones given here)
    format: fp4 format of every operand ("e2m1", "int4", "nvfp4", "nvint4", "mxfp4"; "bf16"/None = none)
    rht: GEMMs whose operands are rotated (list, or true/false for all/none)
    sr: operand roles rounded stochastically everywhere ("x", "w", "dy"); the rest use RTNE
    block, max_level, scale_mode: format options applied to every operand
    x / w / dy: {format, rounding, block, block_2d, max_level, scale_mode} for that role in all GEMMs
    fprop / dgrad / wgrad: {rht, <role>: {...}} for one GEMM (most specific, applied last)
    rht_size, rht_seed: the Hadamard size (16..128) and the seed of its sign vector
    bf16_first, bf16_last: transformer layers kept in high precision (int count, or a float
        fraction of the layers), bf16_layers: explicit layer indices

Specification: docs/recipes.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .formats import FP4Format, make_format
from .grids import ROUNDINGS
from .hadamard import RHT_SIZES

GEMM_ROLES = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("dy", "x")}
ROLES = ("x", "w", "dy")
ALL_GEMMS = list(GEMM_ROLES)

PRESETS: dict[str, dict] = {
    "bf16": {"format": None, "rht": False, "sr": []},
    # The paper's recipe: uniform INT4/E1M2 grid, 1x16 FP32 scales, RHT on all GEMMs, SR on dY.
    "ufp4": {"format": "int4", "rht": ALL_GEMMS, "sr": ["dy"]},
    # The paper's E2M1 reference arm: same scaling, RHT on Wgrad only.
    "e2m1_ref": {"format": "e2m1", "rht": ["wgrad"], "sr": ["dy"]},
    # NVIDIA's NVFP4: E4M3 block + FP32 tensor scales, 16x16 weight blocks, RHT on Wgrad,
    # SR on gradients, first ~3% and last ~13% of the blocks in BF16 (2 + 8 of 62 at 12B).
    "nvfp4": {"format": "nvfp4", "rht": ["wgrad"], "sr": ["dy"], "w": {"block_2d": True},
              "bf16_first": 0.03, "bf16_last": 0.13},
    # UFP4's RHT and SR scopes on the uniform grid with NVFP4's E4M3 block + FP32 tensor scales
    # (nvint4): the scale arithmetic FP4 tensor cores consume.
    "ufp4_nv": {"format": "nvint4", "rht": ALL_GEMMS, "sr": ["dy"]},
    # OCP MXFP4: E8M0 power-of-two scales per 32, Quartet-style RHT everywhere (size 32).
    "mxfp4": {"format": "mxfp4", "rht": ALL_GEMMS, "sr": ["dy"], "rht_size": 32},
}

_TOP_KEYS = {"name", "format", "rht", "sr", "block", "max_level", "scale_mode", "rht_size", "rht_seed",
             "bf16_first", "bf16_last", "bf16_layers", *ROLES, *GEMM_ROLES}
_OPERAND_KEYS = {"format", "rounding", "block", "block_2d", "max_level", "scale_mode"}


@dataclass(frozen=True)
class OperandQuant:
    """How one operand of one GEMM is quantized; ``fmt`` None means high precision."""
    fmt: FP4Format | None = None
    rounding: str = "rtne"

    @property
    def quantized(self) -> bool:
        return self.fmt is not None

    def describe(self) -> str:
        return self.fmt.describe() if self.fmt else "high precision"


@dataclass(frozen=True)
class GemmQuant:
    a: OperandQuant  # left operand of the GEMM  (fprop: x,  dgrad: dy, wgrad: dy^T)
    b: OperandQuant  # right operand, as B in A @ B^T (fprop: w, dgrad: w^T, wgrad: x^T)
    rht: bool = False

    @property
    def quantized(self) -> bool:
        return self.a.quantized


def _fraction_or_count(v, key):
    # written as "inside the range" so that NaN (which fails every comparison) is refused too
    ok = not isinstance(v, bool) and (isinstance(v, int) and v >= 0 or isinstance(v, float) and 0 <= v < 1)
    if not ok:
        raise ValueError(f"recipe.{key}: must be a finite number, a layer count (int >= 0) or a fraction "
                         f"in [0, 1) (got {v!r})")
    return v


@dataclass(frozen=True)
class Recipe:
    name: str
    fprop: GemmQuant
    dgrad: GemmQuant
    wgrad: GemmQuant
    rht_size: int = 16
    rht_seed: int = 0
    bf16_first: float = 0
    bf16_last: float = 0
    bf16_layers: tuple[int, ...] = field(default_factory=tuple)
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # the resolved input dict

    # -- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "Recipe":
        return cls.from_dict({"name": name})

    @classmethod
    def from_dict(cls, d: dict | str | None) -> "Recipe":
        if d is None or isinstance(d, str):
            d = {"name": d or "bf16"}
        if not isinstance(d, dict):
            raise ValueError(f"recipe must be a mapping or a preset name (got {type(d).__name__})")
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise ValueError(f"unknown recipe key {sorted(unknown)[0]!r}; known keys: {sorted(_TOP_KEYS)}")
        name = d.get("name", "custom")
        if "name" in d and name not in PRESETS:
            raise ValueError(f"unknown recipe {name!r}; presets: {sorted(PRESETS)}")
        spec = _merge(copy.deepcopy(PRESETS.get(name, {})), d)
        gemms = {g: _build_gemm(g, spec) for g in GEMM_ROLES}
        rht_size = spec.get("rht_size", 16)
        if isinstance(rht_size, bool) or not isinstance(rht_size, int) or rht_size not in RHT_SIZES:
            raise ValueError(f"recipe.rht_size: must be one of {RHT_SIZES} (got {rht_size!r})")
        layers = spec.get("bf16_layers", [])
        if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"recipe.bf16_layers: must be a list of layer indices (got {layers!r})")
        seed = spec.get("rht_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 64:
            # the range torch.Generator.manual_seed accepts
            raise ValueError(f"recipe.rht_seed: must be an integer in [-2^63, 2^64) (got {seed!r})")
        return cls(name=name, **gemms, rht_size=rht_size, rht_seed=seed,
                   bf16_first=_fraction_or_count(spec.get("bf16_first", 0), "bf16_first"),
                   bf16_last=_fraction_or_count(spec.get("bf16_last", 0), "bf16_last"),
                   bf16_layers=tuple(layers), spec=spec)

    def to_dict(self) -> dict:
        """A dict that rebuilds this recipe exactly (for configs and checkpoints)."""
        return copy.deepcopy(self.spec)

    # -- queries ----------------------------------------------------------------------
    def gemm(self, name: str) -> GemmQuant:
        return getattr(self, name)

    @property
    def quantized(self) -> bool:
        return any(self.gemm(g).quantized for g in GEMM_ROLES)

    def is_high_precision_layer(self, layer: int | None, num_layers: int | None) -> bool:
        """Whether transformer layer ``layer`` (0-based) of ``num_layers`` stays unquantized."""
        if not self.quantized:
            return True
        if layer is None:
            return False
        if layer in self.bf16_layers:
            return True
        if num_layers is None:  # counts from the end (and fractions) need the layer count
            return isinstance(self.bf16_first, int) and layer < self.bf16_first
        n = num_layers
        first = round(self.bf16_first * n) if isinstance(self.bf16_first, float) else self.bf16_first
        last = round(self.bf16_last * n) if isinstance(self.bf16_last, float) else self.bf16_last
        return layer < first or layer >= n - last

    def label(self) -> str:
        """What runs, in a few characters: the preset's name when the recipe is exactly that
        preset, else the name with every overridden key, e.g. ``ufp4[format=e2m1]``, so an
        overridden preset is never reported as the preset itself."""
        base = PRESETS.get(self.name)
        if base is not None and self == Recipe.preset(self.name):
            return self.name
        flat_base = _canonical(_flatten(base or {}))
        changed = [f"{k}={_short(v)}" for k, v in _canonical(_flatten(self.spec)).items()
                   if k != "name" and flat_base.get(k, _LABEL_DEFAULTS.get(k, _MISSING)) != v]
        return f"{self.name}[{'; '.join(changed)}]" if changed else self.name

    def table(self) -> str:
        bf16 = []
        if self.bf16_first:
            bf16.append(f"first {self.bf16_first}")
        if self.bf16_last:
            bf16.append(f"last {self.bf16_last}")
        if self.bf16_layers:
            bf16.append(f"layers {list(self.bf16_layers)}")
        lines = [f"recipe {self.name}: RHT size {self.rht_size} seed {self.rht_seed}; "
                 f"high-precision layers: {', '.join(bf16) or 'none'}",
                 f"{'gemm':<6} {'operand':<8} {'format':<28} {'rounding':<9} RHT"]
        for g, roles in GEMM_ROLES.items():
            gq = self.gemm(g)
            for role, op in zip(roles, (gq.a, gq.b)):
                rounding = op.rounding if op.quantized else "-"
                lines.append(f"{g:<6} {role:<8} {op.describe():<28} {rounding:<9} {'yes' if gq.rht else 'no'}")
        return "\n".join(lines)

    __str__ = table


_MISSING = object()


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"w": {"block_2d": True}}`` -> ``{"w.block_2d": True}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# top-level keys' values when neither the preset nor the user sets them (a key set to one is not a change)
_LABEL_DEFAULTS = {"rht": [], "sr": [], "rht_size": 16, "rht_seed": 0, "bf16_first": 0, "bf16_last": 0,
                   "bf16_layers": []}


def _canonical(flat: dict) -> dict:
    """Spellings of one meaning made equal: ``rht``/``sr`` as sorted lists (true: all, false/null: none)."""
    out = dict(flat)
    for key, allowed in (("rht", ALL_GEMMS), ("sr", ROLES)):
        if key in out:
            try:
                out[key] = sorted(_as_list(out[key], allowed, key))
            except (ValueError, TypeError):
                pass  # invalid: from_dict has refused it already
    return out


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return "none" if v is None else str(v)


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else copy.deepcopy(v)
    return base


def _as_list(v, allowed, key):
    if v is True:
        return list(allowed)
    if v in (False, None):
        return []
    if isinstance(v, str):
        v = [v]
    bad = [x for x in v if x not in allowed] if isinstance(v, (list, tuple)) else [v]
    if bad:
        raise ValueError(f"recipe.{key}: {bad[0]!r} is not one of {list(allowed)}")
    return list(v)


def _operand_fields(d, where) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"recipe.{where} must be a mapping (got {d!r})")
    unknown = set(d) - _OPERAND_KEYS
    if unknown:
        raise ValueError(f"unknown recipe key {where}.{sorted(unknown)[0]}; known: {sorted(_OPERAND_KEYS)}")
    return dict(d)


def _build_operand(gemm: str, role: str, spec: dict) -> OperandQuant:
    sr = _as_list(spec.get("sr", []), ROLES, "sr")
    o = {"format": spec.get("format"), "rounding": "sr" if role in sr else "rtne"}
    o.update({k: spec[k] for k in ("block", "max_level", "scale_mode") if k in spec})
    o.update(_operand_fields(spec.get(role, {}), role))
    o.update(_operand_fields(spec.get(gemm, {}).get(role, {}), f"{gemm}.{role}"))
    where = f"recipe {gemm}.{role}"
    if o["rounding"] not in ROUNDINGS:
        raise ValueError(f"{where}.rounding must be one of {ROUNDINGS} (got {o['rounding']!r})")
    if o["format"] in (None, "bf16", "none"):
        return OperandQuant(None)
    if o.get("block_2d") and role != "w":
        raise ValueError(f"{where}: 2D blocks are for weights only")
    try:
        fmt = make_format(o["format"], block=o.get("block"), block_2d=o.get("block_2d"),
                          max_level=o.get("max_level"), scale_mode=o.get("scale_mode"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return OperandQuant(fmt, o["rounding"])


def _build_gemm(gemm: str, spec: dict) -> GemmQuant:
    gspec = spec.get(gemm, {})
    if not isinstance(gspec, dict):
        raise ValueError(f"recipe.{gemm} must be a mapping (got {gspec!r})")
    unknown = set(gspec) - {"rht", *GEMM_ROLES[gemm]}
    if unknown:
        raise ValueError(f"unknown recipe key {gemm}.{sorted(unknown)[0]}; a {gemm} GEMM has rht, "
                         f"{', '.join(GEMM_ROLES[gemm])}")
    a, b = (_build_operand(gemm, r, spec) for r in GEMM_ROLES[gemm])
    rht = gspec.get("rht", gemm in _as_list(spec.get("rht", False), ALL_GEMMS, "rht"))
    if not isinstance(rht, bool):
        raise ValueError(f"recipe.{gemm}.rht must be true or false (got {rht!r})")
    if a.quantized != b.quantized:
        ra, rb = GEMM_ROLES[gemm]
        raise ValueError(f"recipe {gemm}: {ra} is {a.describe()} but {rb} is {b.describe()}; "
                         "both operands of a GEMM must be quantized, or neither")
    if rht and not a.quantized:
        rht = False  # rotation only matters around a quantizer; an unquantized GEMM ignores it
    return GemmQuant(a, b, rht)

