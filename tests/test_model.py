"""GPT model: config checks, shapes, causality, RoPE, GQA, parameter counts, init, and
which linears follow the FP4 recipe."""
import math
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.linear import ExpertLinear, QuantizedLinear
from megatron_ufp4.linear.telemetry import gemm_states
from megatron_ufp4.model import (PRESETS, Attention, GPTModel, LinearFactory, ModelConfig, MoE, RotaryEmbedding,
                                 count_params, derive_sr_seed, num_params, preset)

pytestmark = pytest.mark.numerical


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def tiny_moe(**kw) -> ModelConfig:
    return tiny(**{**dict(num_layers=3, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, num_shared_experts=1,
                          first_k_dense=1), **kw})


def build(cfg, recipe="bf16", seed=0, **factory_kw):
    torch.manual_seed(seed)
    return GPTModel(cfg, LinearFactory(recipe, cfg.num_layers, **factory_kw))


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("num_heads", 5), ("num_kv_heads", 3), ("hidden_size", 0), ("moe_top_k", 5), ("first_k_dense", 4),
    ("router_score", "relu"), ("moe_capacity_factor", 0.0), ("expert_bias_rate", -1.0), ("aux_loss_coeff", -0.1),
    ("num_experts", -1),
    # NaN fails every comparison, so "v < 0" checks let it through; inf is just as meaningless
    ("aux_loss_coeff", float("nan")), ("aux_loss_coeff", float("inf")), ("expert_bias_rate", float("nan")),
    ("rope_theta", float("inf")), ("norm_eps", float("inf")), ("init_std", float("nan")),
    ("moe_capacity_factor", float("nan")), ("moe_capacity_factor", float("inf")),
])
def test_validate_names_the_field(field, value):
    cfg = tiny_moe(**{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def test_from_dict_rejects_unknown_keys_and_presets():
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict({**tiny().to_dict(), "hiden_size": 3})
    with pytest.raises(ValueError, match="no-such"):
        preset("no-such")
    assert ModelConfig.from_dict(tiny().to_dict()) == tiny()
    assert preset("moe-124b", num_layers=4).num_layers == 4


def test_shared_experts_need_experts():
    with pytest.raises(ValueError, match="num_shared_experts"):
        tiny(num_shared_experts=1).validate()


# -- forward shapes and causality ------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [tiny(), tiny_moe(), tiny(tie_embeddings=True, bias=True)],
                         ids=["dense", "moe", "tied"])
def test_shapes_and_dtype(cfg):
    model = build(cfg, "ufp4")
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    logits = model(tokens)
    assert logits.shape == (2, 32, cfg.vocab_size) and logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(tokens).dtype == torch.float32
    logits.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if cfg.tie_embeddings:
        assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("recipe", ["bf16", "ufp4"])
@pytest.mark.parametrize("moe", [False, True])
def test_causal_masking(recipe, moe):
    cfg = tiny_moe() if moe else tiny()
    model = build(cfg, recipe).eval()
    torch.manual_seed(1)
    a = torch.randint(0, cfg.vocab_size, (2, 32))
    b = a.clone()
    b[:, 20:] = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :20], lb[:, :20], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[:, 20:], lb[:, 20:])


# -- rotary embeddings ----------------------------------------------------------------------------------
def _rope64(x, pos, theta=10000.0):
    """Manual float64 RoPE, rotate-half pairing: (x_i, x_{i+d/2}) as a complex number."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(freqs), pos * freqs)
    return torch.cat([z.real, z.imag], -1)


def test_rope_preserves_norms_and_matches_manual():
    rope = RotaryEmbedding(16, 64)
    x = torch.randn(2, 3, 64, 16, dtype=torch.float64)
    y = rope(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)
    ref = torch.stack([_rope64(x[..., t, :], float(t)) for t in range(64)], dim=-2)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    assert rope(x[..., :1, :]).equal(x[..., :1, :])  # position 0 is the identity
    assert not rope.state_dict()  # non-persistent buffers


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, 64)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(m, n):
        return float(rope(q[None], torch.tensor([m])) @ rope(k[None], torch.tensor([n]))[0])

    for m, n, shift in [(5, 2, 7), (10, 10, 30), (3, 9, 40), (0, 17, 21)]:
        ref = float(_rope64(q, float(m)) @ _rope64(k, float(n)))  # float64, at the original positions
        ref_rel = float(_rope64(q, float(m - n)) @ k)  # only m - n matters
        assert abs(ref - ref_rel) < 1e-10
        assert abs(score(m, n) - ref) < 1e-5 and abs(score(m + shift, n + shift) - ref) < 1e-5


# -- attention ----------------------------------------------------------------------------------
def _attention_reference(x, wqkv, wo, nh, nkv):
    """float64: grouped qkv layout, KV heads repeated, explicit causal softmax."""
    b, t, _ = x.shape
    hd = wo.shape[1] // nh
    r = nh // nkv
    qkv = (x @ wqkv.T).view(b, t, nkv, (r + 2) * hd)
    q = qkv[..., : r * hd].reshape(b, t, nh, hd)
    k = qkv[..., r * hd:(r + 1) * hd].repeat_interleave(r, dim=2)
    v = qkv[..., (r + 1) * hd:].repeat_interleave(r, dim=2)
    pos = torch.arange(t, dtype=torch.float64)
    q = torch.stack([_rope64(q[:, i], float(pos[i])) for i in range(t)], 1)
    k = torch.stack([_rope64(k[:, i], float(pos[i])) for i in range(t)], 1)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(b, t, nh * hd)
    return y @ wo.T


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa_cfg, mha_cfg = tiny(), tiny(num_kv_heads=4)
    rope = RotaryEmbedding(16, 64)
    gqa = Attention(gqa_cfg, LinearFactory("bf16", 2), 0, rope).double()
    mha = Attention(mha_cfg, LinearFactory("bf16", 2), 0, rope).double()
    hd, r = 16, 2
    wg = gqa.qkv.weight.detach().view(2, (r + 2) * hd, 64)  # per group: q0, q1, k, v
    rows = []
    for h in range(4):  # MHA group h: q_h, then the k and v of GQA group h // r
        g = wg[h // r]
        rows += [g[(h % r) * hd:(h % r + 1) * hd], g[r * hd:(r + 1) * hd], g[(r + 1) * hd:]]
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat(rows))
        mha.proj.weight.copy_(gqa.proj.weight)
    x = torch.randn(2, 24, 64, dtype=torch.float64)
    y = gqa(x)
    torch.testing.assert_close(y, mha(x), rtol=1e-10, atol=1e-10)
    ref = _attention_reference(x, gqa.qkv.weight.detach(), gqa.proj.weight.detach(), 4, 2)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)


# -- parameter counts ---------------------------------------------------------------------------------
def test_param_counts_dense_by_hand():
    cfg = tiny()
    V, H, L = 128, 64, 2
    per_layer = H * (4 + 2 * 2) * 16 + 4 * 16 * H + 3 * H * 128 + 2 * H  # qkv, proj, gate_up + down, norms
    expected = 2 * V * H + H + L * per_layer
    assert num_params(cfg) == (expected, expected)
    assert count_params(build(cfg)) == (expected, expected)
    tied = tiny(tie_embeddings=True)
    assert num_params(tied).total == expected - V * H == count_params(build(tied)).total


def test_param_counts_moe_by_hand():
    cfg = tiny_moe()  # 3 layers, layer 0 dense, 4 experts top-2 of width 32, 1 shared of width 32
    V, H, E, f = 128, 64, 4, 32
    attn = H * 8 * 16 + 64 * H
    dense_layer = attn + 3 * H * 128 + 2 * H
    expert = 3 * H * f
    moe_layer = attn + 2 * H + E * H + E * expert + 3 * H * f  # router, experts, shared
    total = 2 * V * H + H + dense_layer + 2 * moe_layer
    active = total - 2 * (E - 2) * expert
    assert num_params(cfg) == (total, active)
    assert count_params(build(cfg)) == (total, active)


def test_presets_sizes():
    for name, (total, active) in {"dense-1.5b": (1.5e9, 1.5e9), "moe-7.9b": (7.9e9, 1.3e9),
                                  "moe-124b": (124e9, 5.1e9)}.items():
        p = num_params(preset(name, mtp_depth=0))  # the named size: without the training-only MTP module
        assert abs(p.total / total - 1) < 0.02 and abs(p.active / active - 1) < 0.05, (name, p)
    assert set(PRESETS) == {"dense-1.5b", "moe-7.9b", "moe-124b"}


def _build_meta(cfg):
    return GPTModel(cfg, LinearFactory("ufp4", cfg.num_layers, device="meta"), device="meta")


def test_meta_build_of_large_config_uses_no_memory():
    cfg = preset("moe-124b", num_layers=4)  # two dense + two 512-expert layers: ~8B parameters
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = _build_meta(cfg)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert all(p.is_meta for p in model.parameters())
    assert count_params(model) == num_params(cfg)
    assert count_params(model).total > 7e9 and grown_mib < 1024


@pytest.mark.slow
def test_meta_build_full_124b():
    cfg = preset("moe-124b")
    assert count_params(_build_meta(cfg)) == num_params(cfg)


def test_meta_then_materialise():
    cfg = tiny_moe()
    model = _build_meta(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert torch.equal(model.rope.cos, build(cfg).rope.cos)
    assert torch.isfinite(model(torch.randint(0, 128, (1, 16)))).all()


# -- init -------------------------------------------------------------------------------------------
def test_init_is_deterministic_and_scaled():
    cfg = tiny(num_layers=8, hidden_size=128, ffn_hidden_size=256, bias=True)
    a, b = build(cfg, seed=3), build(cfg, seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
    std, out_std = 0.02, 0.02 / math.sqrt(16)
    for layer in a.layers.values():
        assert abs(layer.attn.qkv.weight.std() / std - 1) < 0.05
        assert abs(layer.attn.proj.weight.std() / out_std - 1) < 0.05
        assert abs(layer.mlp.gate_up.weight.std() / std - 1) < 0.05
        assert abs(layer.mlp.down.weight.std() / out_std - 1) < 0.05
        assert not layer.attn.qkv.bias.any() and not layer.mlp.down.bias.any()
        assert torch.equal(layer.attn_norm.weight, torch.ones(128))
    assert abs(a.embed.weight.std() / std - 1) < 0.05 and abs(a.head.weight.std() / std - 1) < 0.05


def test_state_dict_roundtrip():
    cfg = tiny_moe()
    a, b = build(cfg, "ufp4", seed=0), build(cfg, "ufp4", seed=1)
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 128, (2, 16))
    assert torch.equal(a(tokens), b(tokens))
    assert "layers.1.mlp.router.expert_bias" in a.state_dict()


# -- which layers follow the recipe -----------------------------------------------------------------------
class RecordingFactory(LinearFactory):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []
        self.expert_calls = []

    def __call__(self, in_features, out_features, *, kind, layer_index, name, bias=False, **metadata):
        self.calls.append((layer_index, name, kind))
        return super().__call__(in_features, out_features, kind=kind, layer_index=layer_index, name=name, bias=bias,
                                **metadata)

    def experts(self, in_features, out_features, *, kind, layer_index, name, proj, **metadata):
        self.expert_calls.append((layer_index, name, proj, kind))
        return super().experts(in_features, out_features, kind=kind, layer_index=layer_index, name=name, proj=proj,
                               **metadata)


def test_every_attention_mlp_expert_linear_is_quantized_and_nothing_else():
    cfg = tiny_moe()
    factory = RecordingFactory("ufp4", cfg.num_layers, seed=5)
    model = GPTModel(cfg, factory)
    # every linear under its own name (a routed expert's: layers.<i>.mlp.experts.<e>.<proj>) and its GEMM state
    linears = {n: g for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, ExpertLinear))
               for n, g in gemm_states(name, m)}
    expected = set()
    for i in range(3):
        expected |= {f"layers.{i}.attn.qkv", f"layers.{i}.attn.proj"}
        mlps = ["mlp"] if i == 0 else [f"mlp.experts.{e}" for e in range(4)] + ["mlp.shared"]
        expected |= {f"layers.{i}.{m}.{p}" for m in mlps for p in ("gate_up", "down")}
    assert set(linears) == expected
    stacks = {n for n, m in model.named_modules() if isinstance(m, ExpertLinear)}
    assert stacks == {f"layers.{i}.mlp.experts.{p}" for i in (1, 2) for p in ("gate_up", "down")}
    modules = dict(model.named_modules())
    for layer_index, name, kind in factory.calls:  # names are state-dict paths inside the block
        lin = modules[f"layers.{layer_index}.{name}"]
        assert isinstance(lin, QuantizedLinear)
        assert kind == ("row" if name.endswith(("proj", "down")) else "column")
        assert lin.quantized and lin.recipe.name == "ufp4"
        assert lin.gemms.generator.initial_seed() == derive_sr_seed(5, layer_index, name)
    assert sorted((i, f"{name}.{proj}") for i, name, proj, _ in factory.expert_calls) == sorted(
        (int(n.split(".")[1]), n.split(".", 2)[2]) for n in stacks)
    for layer_index, name, proj, kind in factory.expert_calls:
        lin = modules[f"layers.{layer_index}.{name}.{proj}"]
        assert kind == ("row" if proj == "down" else "column")
        assert lin.quantized and lin.recipe.name == "ufp4" and lin.experts == tuple(range(4))
        for e, g in zip(lin.experts, lin.gemms):  # each expert: its own seed, from its per-expert name
            assert g.recipe.name == "ufp4"
            assert g.generator.initial_seed() == derive_sr_seed(5, layer_index, f"{name}.{e}.{proj}")
    assert len({g.generator.initial_seed() for g in linears.values()}) == len(linears)
    for n, m in model.named_modules():  # router, embedding, head: plain high-precision torch modules
        if n.endswith("router.linear") or n in ("head", "embed"):
            assert type(m) in (nn.Linear, nn.Embedding), n


def test_sr_seed_is_stable_and_depends_on_everything():
    assert derive_sr_seed(0, 3, "attn.qkv") == derive_sr_seed(0, 3, "attn.qkv")
    seeds = {derive_sr_seed(s, i, n) for s in (0, 1) for i in (0, 1) for n in ("attn.qkv", "attn.proj")}
    assert len(seeds) == 8 and all(0 <= s < 2 ** 63 for s in seeds)


def test_bf16_first_last_layers_stay_high_precision():
    cfg = tiny_moe(num_layers=4)
    model = build(cfg, {"name": "ufp4", "bf16_first": 1, "bf16_last": 1})
    for layer in model.layers.values():
        flags = {m.quantized for m in layer.modules() if isinstance(m, QuantizedLinear)}
        assert flags == ({False} if layer.layer_index in (0, 3) else {True}), layer.layer_index
    for layer in build(cfg, "bf16").layers.values():
        assert not any(m.quantized for m in layer.modules() if isinstance(m, QuantizedLinear))


def test_factory_checks():
    with pytest.raises(ValueError, match="num_layers"):
        LinearFactory("ufp4", None)
    with pytest.raises(ValueError, match="kind"):
        LinearFactory("ufp4", 2)(64, 64, kind="diagonal", layer_index=0, name="x")
    with pytest.raises(ValueError, match="num_layers"):
        GPTModel(tiny(), LinearFactory("ufp4", 5))
    assert isinstance(LinearFactory(Recipe.preset("nvfp4"), 2).recipe, Recipe)


def test_bf16_recipe_model_matches_plain_linear_math():
    """A bf16-recipe model is ordinary torch math: F.linear everywhere, gradients flow."""
    cfg = tiny()
    model = build(cfg).double()
    tokens = torch.randint(0, 128, (1, 8))
    logits = model(tokens)
    loss = F.cross_entropy(logits.view(-1, 128), tokens.view(-1))
    loss.backward()
    assert model.layers["0"].attn.qkv.weight.grad is not None and isinstance(model.moe_stats(), dict)
    assert not any(isinstance(m, MoE) for m in model.modules())
