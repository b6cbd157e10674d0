"""Model shape as a dataclass: one place that says what a GPT (dense or MoE) looks like.

``ModelConfig.validate()`` rejects impossible shapes with a ``ValueError`` that names the
field; ``from_dict`` rejects unknown keys (typos in YAML fail loudly).  ``PRESETS`` (the
source of a run config's ``model: {preset: NAME}``, through ``with_preset``) holds
the shapes this project uses for the paper's model sizes (arXiv 2606.20381: the paper gives
names only, so these are our documented choices; totals come from ``num_params``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

ROUTER_SCORES = ("softmax", "sigmoid")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    bias: bool = False  # bias on the attention / MLP / expert linears
    head_dim: int | None = None  # per attention head; None: hidden_size // num_heads (resolved on construction)
    qk_norm: bool = False  # RMSNorm over head_dim on every query and key head before RoPE (one weight each)
    rotary_fraction: float = 1.0  # RoPE on the first int(fraction * head_dim) channels of each head; rest unrotated
    # -- mixture of experts (num_experts == 0: every layer dense) -------------------------
    num_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden_size: int | None = None  # per routed/shared expert; None: ffn_hidden_size
    num_shared_experts: int = 0
    first_k_dense: int = 0  # layers [0, first_k_dense) stay dense
    router_score: str = "softmax"  # "softmax" | "sigmoid"
    router_norm_topk: bool = True  # renormalise the k selected weights to sum to 1
    aux_loss_coeff: float = 0.01  # Switch/GShard load-balancing loss; 0: off
    expert_bias_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3) update speed; 0: off
    moe_capacity_factor: float | None = None  # None: no token dropping
    # group-limited routing (DeepSeek-V3): experts in router_groups equal groups, a token picks its
    # top-k experts inside its router_topk_groups best groups (group score: sum of its 2 best scores)
    router_groups: int = 1
    router_topk_groups: int = 1
    routed_scaling_factor: float = 1.0  # routed experts' weights multiplied by this (after renormalisation)
    # -- multi-token prediction (DeepSeek-V3 MTP): depth k predicts token t+k+1 ---------------
    mtp_depth: int = 0  # MTP modules after the last layer; 0: none
    mtp_loss_coeff: float = 0.1  # the MTP losses' weight: coeff / depth * sum over depths

    def __post_init__(self):
        if self.head_dim is None and _divides(self.num_heads, self.hidden_size):
            self.head_dim = self.hidden_size // self.num_heads

    # -- derived ----------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None else self.ffn_hidden_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.num_experts > 0 and layer_index >= self.first_k_dense

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def bad(name, why):
            raise ValueError(f"ModelConfig.{name} {why} (got {getattr(self, name)!r})")

        def finite(name, low, strict, alt=""):  # NaN fails every comparison: test "inside", never "outside"
            v = getattr(self, name)
            if not (math.isfinite(v) and (v > low if strict else v >= low)):
                bad(name, f"must be finite and {'>' if strict else '>='} {low:g}{alt}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                     "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be a positive integer")
        if self.head_dim is None:
            bad("num_heads", f"must divide hidden_size={self.hidden_size} (or set head_dim)")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1:
            bad("head_dim", "must be a positive integer (or None: hidden_size // num_heads)")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if not (math.isfinite(self.rotary_fraction) and 0 < self.rotary_fraction <= 1):
            bad("rotary_fraction", "must be finite and in (0, 1]")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            bad("rotary_fraction", f"gives rotary_dim = int({self.rotary_fraction} * head_dim={self.head_dim}) = "
                                   f"{self.rotary_dim}; rotary embeddings need it even and >= 2")
        finite("rope_theta", 0, True)
        finite("routed_scaling_factor", 0, True)
        finite("mtp_loss_coeff", 0, False)
        finite("norm_eps", 0, True)
        finite("init_std", 0, True)
        finite("aux_loss_coeff", 0, False)
        finite("expert_bias_rate", 0, False)
        if self.moe_capacity_factor is not None:
            finite("moe_capacity_factor", 0, True, " (or None: no token dropping)")
        for name in ("num_experts", "num_shared_experts", "first_k_dense", "mtp_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "must be an integer >= 0")
        if self.first_k_dense > self.num_layers:
            bad("first_k_dense", f"must be <= num_layers={self.num_layers}")
        if self.router_score not in ROUTER_SCORES:
            bad("router_score", f"must be one of {ROUTER_SCORES}")
        if self.num_experts > 0:
            if isinstance(self.moe_top_k, bool) or not isinstance(self.moe_top_k, int) or self.moe_top_k < 1:
                bad("moe_top_k", "must be a positive integer")
            if self.moe_top_k > self.num_experts:
                bad("moe_top_k", f"must be <= num_experts={self.num_experts}")
            f = self.moe_ffn_hidden_size
            if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 1):
                bad("moe_ffn_hidden_size", "must be a positive integer or None")
            g, tg = self.router_groups, self.router_topk_groups
            if isinstance(g, bool) or not isinstance(g, int) or g < 1 or self.num_experts % g:
                bad("router_groups", f"must be a positive integer dividing num_experts={self.num_experts}")
            if g > 1 and self.num_experts // g < 2:
                bad("router_groups", "must leave >= 2 experts per group (a group scores by its 2 best experts)")
            if isinstance(tg, bool) or not isinstance(tg, int) or not 1 <= tg <= g:
                bad("router_topk_groups", f"must be an integer in [1, router_groups={g}]")
            if tg * (self.num_experts // g) < self.moe_top_k:
                bad("router_topk_groups", f"leaves {tg * (self.num_experts // g)} experts to choose from, fewer "
                                          f"than moe_top_k={self.moe_top_k}")
        elif self.num_shared_experts:
            bad("num_shared_experts", "needs num_experts > 0")
        return self

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build and validate from a mapping; ``preset: NAME`` starts from ``PRESETS[NAME]``."""
        d = with_preset(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig key {unknown[0]!r}; known keys: {sorted(known)}")
        return cls(**d).validate()


def _divides(a, b) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (a, b)) and b % a == 0


def upgrade_saved_model(d: dict) -> dict:
    """A model section saved before a field existed, with that field's default (``head_dim``
    resolved as then: hidden_size // num_heads), so resuming an older run compares equal."""
    out = {f.name: f.default for f in dataclasses.fields(ModelConfig)
           if f.default is not dataclasses.MISSING and f.name not in d}
    out.update(d)
    if out.get("head_dim") is None and _divides(out.get("num_heads"), out.get("hidden_size")):
        out["head_dim"] = out["hidden_size"] // out["num_heads"]
    return out


def with_preset(d: dict) -> dict:
    """``d`` with its ``preset: NAME`` replaced by ``PRESETS[NAME]``'s fields, ``d``'s own
    fields on top (a copy; ``d`` without ``preset`` comes back unchanged)."""
    d = dict(d)
    if "preset" not in d:
        return d
    name = d.pop("preset")
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"ModelConfig.preset must be one of {', '.join(PRESETS)} (got {name!r}{hint})")
    return {**PRESETS[name], **d}


LING_VOCAB = 157184
# Ling 2.0-style MoE choices (public Ling / DeepSeek-V3 configurations; the paper states none of
# them, docs/models.md gives the reasons): sigmoid router in 8 groups of which a token uses its 4
# best, weights renormalised then x2.5, balancing by the aux-loss-free expert bias (DeepSeek-V3's
# update rate 1e-3) and no auxiliary loss, QK-norm, RoPE on half of each 128-wide head, one MTP
# module (loss weight 0.1), RMSNorm eps 1e-6.
LING_MOE = dict(router_score="sigmoid", router_groups=8, router_topk_groups=4, routed_scaling_factor=2.5,
                aux_loss_coeff=0.0, expert_bias_rate=1e-3, qk_norm=True, rotary_fraction=0.5, mtp_depth=1,
                mtp_loss_coeff=0.1, norm_eps=1e-6)
# Llama-style stacks with standard GQA attention in place of Ling 3.0's hybrid linear attention
# (a documented substitution, arXiv 2606.20381); every width a multiple of 32 so all FP4 recipes
# (MXFP4's 1x32 blocks included) apply.  num_params (untied head, embeddings included; the MTP
# module is training-only and is not exported):
#   dense-1.5b  1.512B
#   moe-7.9b    7.917B total / 1.270B active, + MTP 8.242B / 1.305B  (24 layers, 14 heads of 128 with
#               2 KV heads, 128 experts top-8 + 1 shared, first layer dense; Ling-3.0-tiny-like)
#   moe-124b  124.140B total / 5.232B active, + MTP 127.239B / 5.358B  (42 layers, 32 heads of 128 with
#               4 KV heads, first 2 dense, 512 experts top-8 + 1 shared)
PRESETS: dict[str, dict] = {
    "dense-1.5b": dict(vocab_size=LING_VOCAB, hidden_size=2048, num_layers=18, num_heads=16, num_kv_heads=4,
                       ffn_hidden_size=6144, max_seq_len=4096),
    "moe-7.9b": dict(vocab_size=LING_VOCAB, hidden_size=1792, num_layers=24, num_heads=14, num_kv_heads=2,
                     ffn_hidden_size=4864, max_seq_len=4096, num_experts=128, moe_top_k=8,
                     moe_ffn_hidden_size=448, num_shared_experts=1, first_k_dense=1, **LING_MOE),
    "moe-124b": dict(vocab_size=LING_VOCAB, hidden_size=4096, num_layers=42, num_heads=32, num_kv_heads=4,
                     ffn_hidden_size=6144, max_seq_len=4096, num_experts=512, moe_top_k=8,
                     moe_ffn_hidden_size=480, num_shared_experts=1, first_k_dense=2, **LING_MOE),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset shape with fields overridden (e.g. ``preset("moe-124b", num_layers=4)``)."""
    return ModelConfig.from_dict({"preset": name, **overrides})
