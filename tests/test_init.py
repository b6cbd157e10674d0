"""Layout-independent initialisation (model/init.py).

Every weight element is a pure function of (init seed, the parameter's global name, the
element's global index), so a tensor-, pipeline- or expert-parallel rank that builds only
its own shard gets exactly the single-process model's values there.  The layout checks
below therefore assert exact (bitwise) equality; only the statistical properties of the
normal generator itself are checked against bounds, each derived next to it.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from megatron_ufp4.linear.expert_linear import stacked_name
from megatron_ufp4.model import GPTModel, LinearFactory, ModelConfig
from megatron_ufp4.model import init as init_mod
from megatron_ufp4.model.expert_keys import per_expert_views, unstack_experts
from megatron_ufp4.model.init import KeyedInit, global_index, keyed_normal, name_key
from megatron_ufp4.model.placement import Placement, named_placements
from megatron_ufp4.parallel.expert import shard_experts
from megatron_ufp4.parallel.parallel_factory import ParallelLinearFactory, build_tensor_parallel_gpt, shard_tensor
from megatron_ufp4.parallel.pipeline import build_stage_modules
from megatron_ufp4.parallel.state import ParallelState
from tp_reference import shard_state_dict

pytestmark = [pytest.mark.numerical, pytest.mark.usefixtures("single_thread")]

BASE = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
            max_seq_len=16)
# layer 0 dense, layer 1 MoE with 4 routed experts (each gate_up 64 x 64, parts=2) and a shared expert
MOE = dict(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, num_shared_experts=1, first_k_dense=1)


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw}).validate()


def full_model(config: ModelConfig, recipe="bf16", init_seed=5, meta=False) -> GPTModel:
    if meta:
        with torch.device("meta"):
            return GPTModel(config, LinearFactory(recipe, config.num_layers), init_seed=init_seed)
    return GPTModel(config, LinearFactory(recipe, config.num_layers), init_seed=init_seed)


def fake_state(tp=2, rank=0) -> ParallelState:
    return ParallelState(world_size=tp, tp=tp, tp_rank=rank, sequence_parallel=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and every byte (stricter than ==: tells -0.0 from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def assert_state_equal(got: dict, ref: dict) -> None:
    for k, v in got.items():
        if isinstance(v, torch.Tensor):
            assert k in ref, k
            assert same_bits(v, ref[k]), k


# -- 1. global_index ---------------------------------------------------------------------------------
SPECS = [
    Placement((16,), 0, 1, 1, 0),              # unsharded 1-D
    Placement((16,), 0, 1, 2, 1),              # 1-D, 2 shards
    Placement((16,), 0, 2, 4, 3),              # 1-D fused bias: 2 parts, 4 shards
    Placement((8, 6), 0, 1, 2, 0),             # column-parallel weight
    Placement((8, 6), 0, 1, 2, 1),
    Placement((8, 6), 0, 2, 2, 1),             # fused [gate; up], rank 1
    Placement((16, 6), 0, 2, 4, 2),            # fused, 4 shards
    Placement((6, 8), 1, 1, 2, 1),             # row-parallel weight
    Placement((6, 8), 1, 1, 4, 3),
    Placement((6, 8), 1, 2, 2, 0),             # fused along dim 1
    Placement((6, 16), 1, 2, 4, 1),
    Placement((8, 6), 0, 2, 1, 0),             # parts but no split: the identity
    Placement((4, 8, 6), 1, 2, 2, 1),          # 3-D, split a middle dim
]


def _local_shape(spec: Placement) -> tuple[int, ...]:
    shape = list(spec.global_shape)
    shape[spec.dim] //= spec.num_shards
    return tuple(shape)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_global_index_matches_shard_tensor(spec):
    n = math.prod(spec.global_shape)
    ref = shard_tensor(torch.arange(n).view(spec.global_shape), spec.dim, spec.parts, spec.num_shards, spec.shard)
    shape = _local_shape(spec)
    assert ref.shape == shape
    idx = global_index(shape, spec, "cpu")
    assert idx.dtype == torch.int64 and torch.equal(idx.expand(shape), ref)
    for rows in (slice(0, 1), slice(1, shape[0]), slice(1, shape[0] - 1)):
        assert torch.equal(global_index(shape, spec, "cpu", rows).expand(ref[rows].shape), ref[rows]), rows


def test_global_index_shards_tile_the_tensor():
    """Over all shards every global index appears exactly once (no overlap, no gap)."""
    for spec in SPECS:
        shape = _local_shape(spec)
        allidx = torch.cat([global_index(shape, Placement(spec.global_shape, spec.dim, spec.parts, spec.num_shards,
                                                          r), "cpu").expand(shape).reshape(-1)
                            for r in range(spec.num_shards)])
        assert torch.equal(allidx.sort().values, torch.arange(math.prod(spec.global_shape))), spec


def test_global_index_rejects_rank_mismatch():
    with pytest.raises(ValueError, match="does not match global shape"):
        global_index((4,), Placement((4, 4)), "cpu")


# -- 2. keyed_normal -----------------------------------------------------------------------------------
N = 1 << 20  # ~1e6 draws


@pytest.fixture(scope="module")
def draws():
    key = name_key(3, "layers.0.attn.qkv.weight")
    return key, keyed_normal(key, torch.arange(N))


def test_keyed_normal_is_deterministic(draws):
    key, z = draws
    assert z.dtype == torch.float64 and z.shape == (N,)
    assert same_bits(keyed_normal(key, torch.arange(N)), z)
    # a pure function of (key, index): any subset, order or shape of indices gives the same values
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:5000]
    assert same_bits(keyed_normal(key, perm), z[perm])
    assert same_bits(keyed_normal(key, torch.arange(N).view(1024, 1024)[3:5]), z.view(1024, 1024)[3:5])


def test_keyed_normal_moments_and_tails(draws):
    _, z = draws
    n = z.numel()
    assert torch.isfinite(z).all()
    # mean of n iid N(0, 1): standard error 1 / sqrt(n)
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    # sample std of n iid N(0, 1): standard error ~ 1 / sqrt(2n)
    assert abs(float(z.std()) - 1.0) < 5 / math.sqrt(2 * n)
    # P(|z| > 2) = erfc(2 / sqrt 2) = 0.0455; binomial standard error sqrt(p (1 - p) / n)
    p = math.erfc(2 / math.sqrt(2))
    frac = float((z.abs() > 2).double().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    # u1 has 48 bits, u1 >= 2^-49, so |z| <= sqrt(-2 ln 2^-49) = 8.24
    bound = math.sqrt(-2 * math.log(2.0 ** -49))
    assert bound < 9 and float(z.abs().max()) <= bound


def test_keyed_normal_streams_are_uncorrelated(draws):
    key, z = draws
    n = z.numel()
    # Pearson correlation of two independent N(0, 1) samples: standard error 1 / sqrt(n)
    se = 1 / math.sqrt(n)
    others = {
        "other name": keyed_normal(name_key(3, "layers.0.attn.proj.weight"), torch.arange(N)),
        "other seed": keyed_normal(name_key(4, "layers.0.attn.qkv.weight"), torch.arange(N)),
        "key + 1": keyed_normal(key + 1, torch.arange(N)),
    }
    for what, w in others.items():
        assert not torch.equal(w, z), what
        corr = float(torch.corrcoef(torch.stack([z, w]))[0, 1])
        assert abs(corr) < 5 * se, (what, corr)
    lag1 = float(torch.corrcoef(torch.stack([z[1:], z[:-1]]))[0, 1])  # neighbouring elements
    assert abs(lag1) < 5 / math.sqrt(n - 1)


def test_keyed_normal_wide_indices():
    key = name_key(0, "embed.weight")
    lo = (1 << 31) - 10
    idx = torch.arange(lo, lo + 4096)
    z = keyed_normal(key, idx)
    assert torch.isfinite(z).all() and float(z.abs().max()) < 9
    # an index below 2^31 draws the same whether or not the tensor also holds indices >= 2^31
    assert same_bits(keyed_normal(key, idx[:10]), z[:10])
    # indices >= 2^31 each draw their own value, not the one of their low 31 bits
    wrapped = keyed_normal(key, idx[10:] & ((1 << 31) - 1))
    assert not (z[10:] == wrapped).any()
    assert same_bits(keyed_normal(key, idx[100:200]), z[100:200])
    # beyond 2^32 too (a 2^33-element tensor's last shard)
    far = torch.arange((1 << 33) - 50, (1 << 33) + 50)
    zf = keyed_normal(key, far)
    assert torch.isfinite(zf).all() and same_bits(keyed_normal(key, far[50:]), zf[50:])
    assert len(set(zf.tolist())) == zf.numel()


def test_name_key_is_stable_and_62_bit():
    k = name_key(5, "layers.1.mlp.experts.3.gate_up.weight")
    assert k == name_key(5, "layers.1.mlp.experts.3.gate_up.weight") and 0 <= k < (1 << 62)
    assert len({name_key(s, n) for s in (0, 1) for n in ("a.weight", "b.weight", "a.bias")}) == 6


# -- KeyedInit on one module -----------------------------------------------------------------------------
def test_keyed_init_is_the_formula_and_chunking_does_not_matter(monkeypatch):
    root = nn.Module()
    root.lin = nn.Linear(24, 40, bias=True)
    root.lowp = nn.Linear(24, 40, bias=False, dtype=torch.bfloat16)
    init = KeyedInit(root, seed=11)
    idx = torch.arange(40 * 24).view(40, 24)
    for mod, name in ((root.lin, "lin.weight"), (root.lowp, "lowp.weight")):
        init.normal_(mod, "weight", std=0.02)
        expect = (keyed_normal(name_key(11, name), idx) * 0.02).to(mod.weight.dtype)  # one rounding from float64
        assert same_bits(mod.weight, expect), name
    init.normal_(root.lin, "bias", std=1.0)
    assert same_bits(root.lin.bias, keyed_normal(name_key(11, "lin.bias"), torch.arange(40)).float())
    whole = root.lin.weight.clone()
    monkeypatch.setattr(init_mod, "_ROWS_PER_CHUNK", 7 * 24 + 5)  # 7 rows per chunk, the last chunk short
    with torch.no_grad():
        root.lin.weight.zero_()
        root.lin.bias.zero_()
    init.normal_(root.lin, "weight", std=0.02)
    assert same_bits(root.lin.weight, whole)
    monkeypatch.setattr(init_mod, "_ROWS_PER_CHUNK", 3)  # 1-D: 3 elements per chunk
    init.normal_(root.lin, "bias", std=1.0)
    assert same_bits(root.lin.bias, keyed_normal(name_key(11, "lin.bias"), torch.arange(40)).float())
    with pytest.raises(ValueError, match="not part of the module"):
        init.normal_(nn.Linear(2, 2))


def test_model_weights_are_keyed_by_global_name():
    c = cfg(**MOE)
    m = full_model(c, init_seed=5)
    std = c.init_std
    out_std = std / math.sqrt(2 * c.num_layers)
    for name, s in (("embed.weight", std), ("head.weight", std), ("layers.0.attn.qkv.weight", std),
                    ("layers.0.attn.proj.weight", out_std), ("layers.0.mlp.down.weight", out_std),
                    ("layers.1.mlp.router.linear.weight", std), ("layers.1.mlp.experts.2.gate_up.weight", std),
                    ("layers.1.mlp.experts.3.down.weight", out_std), ("layers.1.mlp.shared.gate_up.weight", std)):
        stacked = stacked_name(name)  # a routed expert's weight: its slice of the layer's stack
        p = m.get_parameter(name) if stacked is None else \
            m.get_parameter(stacked[0])[named_placements(m)[stacked[0]].experts.index(stacked[1])]
        expect = (keyed_normal(name_key(5, name), torch.arange(p.numel()).view(p.shape)) * s).to(p.dtype)
        assert same_bits(p, expect), name


# -- 3. tensor parallelism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,kw", [("ufp4", dict(bias=True)), ("bf16", dict(bias=True, **MOE))],
                         ids=["dense-ufp4", "moe-bf16"])
def test_tensor_parallel_shards_equal_the_single_process_model(recipe, kw):
    c = cfg(**kw)
    ref = full_model(c, recipe, init_seed=5)
    ref_sd = ref.state_dict()
    shards = []
    for r in range(2):
        st = fake_state(2, r)
        tp = build_tensor_parallel_gpt(c, ParallelLinearFactory(recipe, c.num_layers, st), init_seed=5)
        sd = tp.state_dict()
        tp_placements = named_placements(tp)
        assert sorted(sd) == sorted(ref_sd)
        expect = shard_state_dict(ref_sd, tp, st)
        sharded = [k for k, where in named_placements(tp).items() if where.split]
        # sharded: qkv, proj, gate_up (parts=2), down, the vocab-parallel embedding and head (+ biases)
        assert {"embed.weight", "head.weight", "layers.0.attn.qkv.weight", "layers.0.attn.qkv.bias",
                "layers.0.attn.proj.weight", "layers.0.mlp.gate_up.weight", "layers.0.mlp.gate_up.bias",
                "layers.0.mlp.down.weight"} <= set(sharded)
        for k in sharded:
            assert sd[k].shape != ref_sd[k].shape, k
        assert_state_equal(sd, expect)
        shards.append(unstack_experts(sd, tp_placements))  # routed experts per expert (checkpoint keys)
    # the two ranks hold different halves (the shard index enters the values)
    assert not torch.equal(shards[0]["layers.0.attn.qkv.weight"], shards[1]["layers.0.attn.qkv.weight"])
    if c.num_experts:
        gu = unstack_experts(ref_sd, named_placements(ref))["layers.1.mlp.experts.1.gate_up.weight"]
        f = c.expert_ffn_hidden_size
        # rank 1 of the fused [gate; up]: rows [f/2, f) of gate, then rows [f + f/2, 2f) of up
        want = torch.cat([gu[f // 2:f], gu[f + f // 2:]])
        assert same_bits(shards[1]["layers.1.mlp.experts.1.gate_up.weight"], want)


def test_tensor_parallel_with_tied_embeddings():
    c = cfg(tie_embeddings=True)
    ref_sd = full_model(c, init_seed=5).state_dict()
    for r in range(2):
        st = fake_state(2, r)
        tp = build_tensor_parallel_gpt(c, ParallelLinearFactory("bf16", c.num_layers, st), init_seed=5)
        assert tp.head.weight is tp.embed.weight
        assert_state_equal(tp.state_dict(), shard_state_dict(ref_sd, tp, st))


# -- 4. pipeline -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True), MOE], ids=["dense", "tied", "moe"])
@pytest.mark.parametrize("vpp", [1, 2])
def test_meta_pipeline_chunks_equal_the_full_model(kw, vpp):
    c = cfg(num_layers=4, **kw)
    ref = full_model(c, init_seed=7)
    ref_sd = ref.state_dict()
    covered = []
    for r in range(2):
        meta = full_model(c, init_seed=7, meta=True)
        assert all(p.is_meta for p in meta.parameters())
        torch.manual_seed(1000 + r)  # the global generator plays no part in materialising
        chunks = build_stage_modules(meta, pp=2, pp_rank=r, vpp=vpp, device="cpu")
        assert len(chunks) == vpp
        held = set()
        for ch in chunks:
            sd = ch.state_dict()
            assert not any(t.is_meta for t in [*ch.parameters(), *ch.buffers()])
            assert_state_equal(sd, ref_sd)
            held |= set(sd)
            covered += list(sd)
            if ch.head is not None and c.tie_embeddings:
                assert same_bits(ch.head.weight, ref.embed.weight)  # the last stage's copy of the tied weight
                if ch.embed is not None:
                    assert ch.head.weight is ch.embed.weight
        # nothing outside this rank's chunks got allocated
        outside = [k for k, p in meta.named_parameters(remove_duplicate=False) if k not in held]
        assert outside and all(meta.get_parameter(k).is_meta for k in outside)
        other_layers = [i for i in range(c.num_layers) if all(str(i) not in ch.layers for ch in chunks)]
        assert other_layers and all(p.is_meta for i in other_layers for p in meta.layers[str(i)].parameters())
    assert sorted(covered) == sorted(ref_sd)  # every key once, over the two ranks


# -- 5. expert parallelism ---------------------------------------------------------------------------------
def _expert_params(model) -> dict:
    """The routed experts' parameters, one entry per expert under its per-expert name (a view
    of the stacked layer's slice): ``layers.<i>.mlp.experts.<e>.<proj>.weight``."""
    return {k: p for k, p in per_expert_views(model.named_parameters(), named_placements(model))
            if ".mlp.experts." in k}


def _per_expert(sd: dict, model) -> dict:
    """A state dict of ``model`` (or of its pipeline chunk) with routed experts per expert."""
    return unstack_experts(sd, named_placements(model))


def test_shard_experts_keeps_global_names_and_values():
    c = cfg(**MOE)
    full = full_model(c, init_seed=5)
    ref = _expert_params(full)
    names = []
    for r in range(2):
        ep = shard_experts(copy.deepcopy(full), 2, r)
        got = _expert_params(ep)
        assert {k.split(".")[4] for k in got} == {str(e) for e in range(2 * r, 2 * r + 2)}
        for k, p in got.items():
            assert same_bits(p, ref[k]), k
        names += list(got)
    assert sorted(names) == sorted(ref)


def test_experts_initialised_on_another_layout_get_the_same_values():
    c = cfg(**MOE)
    ref = full_model(c, init_seed=5)
    ref_sd = ref.state_dict()
    ref_per = _per_expert(ref_sd, ref)
    for r in range(2):
        # expert-sharded on the meta device, then materialised: only this rank's experts exist
        meta = shard_experts(full_model(c, init_seed=5, meta=True), 2, r)
        meta.to_empty(device="cpu")
        meta.init_weights()
        sd = _per_expert(meta.state_dict(), meta)
        assert len([k for k in sd if ".experts." in k]) == len([k for k in ref_per if ".experts." in k]) // 2
        assert {k.split(".")[4] for k in sd if ".experts." in k} == {str(e) for e in range(2 * r, 2 * r + 2)}
        assert_state_equal(sd, ref_per)
        # expert- and tensor-parallel at once
        st = fake_state(2, r)
        tp = build_tensor_parallel_gpt(c, ParallelLinearFactory("bf16", c.num_layers, st), init_seed=5)
        shard_experts(tp, 2, 1 - r)
        tp.init_weights()  # re-initialise on the sharded layout
        assert_state_equal(tp.state_dict(), shard_state_dict(ref_sd, tp, st))
        # expert-sharded pipeline chunk of a meta model
        meta = shard_experts(full_model(c, init_seed=5, meta=True), 2, r)
        (last,) = build_stage_modules(meta, pp=2, pp_rank=1, device="cpu")
        assert "1" in last.layers
        assert_state_equal(_per_expert(last.state_dict(), last), ref_per)


# -- 6. seeds and construction order -----------------------------------------------------------------------
def _weights(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def test_init_seed_decides_the_weights():
    c = cfg(**MOE)
    a = _weights(full_model(c, init_seed=5))
    b = _weights(full_model(c, init_seed=6))
    za, zb = [], []
    for k in a:
        if k.endswith("norm.weight"):
            assert torch.equal(a[k], b[k]) and bool((a[k] == 1).all()), k  # unit norms, not random
        elif not k.endswith(".bias"):
            assert not torch.equal(a[k], b[k]), k
            s = a[k].std()
            za.append((a[k] / s).reshape(-1).double())
            zb.append((b[k] / s).reshape(-1).double())
    za, zb = torch.cat(za), torch.cat(zb)
    n = za.numel()
    # two independent float32 normals coincide with probability ~ int f(x)^2 ulp(x) dx <= 2^-23 / (2 pi)
    # ~ 2e-8 per element: expected count n * 2e-8 < 0.01 here, so more than 5 would not be chance
    assert int((za == zb).sum()) <= 5
    # Pearson correlation of independent draws: standard error 1 / sqrt(n)
    assert abs(float(torch.corrcoef(torch.stack([za, zb]))[0, 1])) < 5 / math.sqrt(n)


def test_same_init_seed_ignores_construction_order_and_global_rng():
    c = cfg(**MOE)
    torch.manual_seed(0)
    a = _weights(full_model(c, init_seed=5))
    torch.manual_seed(12345)
    torch.randn(1000)
    GPTModel(cfg(num_layers=3), LinearFactory("bf16", 3), init_seed=99)  # an unrelated model in between
    nn.Linear(64, 64)
    m = full_model(c, init_seed=5)
    b = _weights(m)
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    m.init_weights()  # re-initialising reproduces the same values
    assert all(same_bits(p, a[k]) for k, p in m.named_parameters())
    # a different recipe (other linear classes, SR seeds) does not enter the weights either
    u = _weights(full_model(c, "ufp4", init_seed=5))
    assert all(same_bits(u[k], a[k]) for k in a)


def test_init_seed_none_follows_torch_manual_seed():
    c = cfg()
    torch.manual_seed(3)
    a = full_model(c, init_seed=None)
    torch.manual_seed(3)
    b = full_model(c, init_seed=None)
    torch.manual_seed(4)
    d = full_model(c, init_seed=None)
    assert a.init_seed == b.init_seed != d.init_seed
    wa, wb = _weights(a), _weights(b)
    assert all(same_bits(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["embed.weight"], d.embed.weight)
    assert all(same_bits(wa[k], v) for k, v in _weights(full_model(c, init_seed=a.init_seed)).items())


# -- the compiled path of large chunks: the eager values, bit for bit -----------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keyed_values_of_large_chunks_equal_the_eager_formula(dtype, monkeypatch):
    """A chunk of >= 2^17 elements runs a compiled kernel whose float64 log / cos may differ from
    the eager ops in the last bits; elements within 2^-44 of a float32 rounding boundary are
    recomputed eagerly (bfloat16 rounds from float32, as eager's cast does), so the values are
    the eager formula's.  Mutation: a kernel that rounds every such
    element the wrong way still gives the eager values."""
    import megatron_ufp4.model.init as init

    idx = torch.arange(1 << 21, dtype=torch.int64) + 12345  # some elements near a float32 boundary
    want = (keyed_normal(99, idx) * 0.02).to(dtype)
    got = init.keyed_values(99, idx, 0.02, dtype, compiled=True)
    assert init._compiled not in (None, False) and same_bits(got, want)

    real = init._compiled

    def wrong_near(*args):  # the kernel's values with every near-boundary element wrong
        out, near = real(*args)
        out = out.clone()
        out[near] = -out[near]
        return out, near

    monkeypatch.setattr(init, "_compiled", wrong_near)
    keys = [init.derive_key(99, j) for j in range(3)]
    assert not same_bits(wrong_near(*keys, idx, torch.tensor(0.02, dtype=torch.float64), dtype)[0], want)
    assert same_bits(init.keyed_values(99, idx, 0.02, dtype, compiled=True), want)


def test_only_a_model_worth_the_compile_initialises_through_the_kernel(monkeypatch):
    """The kernel's compile (seconds) pays off from ``COMPILE_WORTH`` elements per ``KeyedInit``;
    below, the eager ops run and the kernel is never asked for (the values are equal either way)."""
    import megatron_ufp4.model.init as init

    small = torch.nn.Linear(1 << 10, 1 << 10, bias=False)
    large = torch.nn.Linear(init.COMPILE_WORTH >> 10, 1 << 10, bias=False, device="meta")
    assert not KeyedInit(small, 1).compiled and KeyedInit(large, 1).compiled

    calls = []
    monkeypatch.setattr(init, "_compiled", lambda *args: calls.append(args))  # (a failing kernel is set aside)
    keyed = KeyedInit(small, 1)
    keyed.normal_(small, std=0.02)
    assert calls == [] and init._compiled is not False
    idx = torch.arange(1 << 20, dtype=torch.int64).view(1 << 10, 1 << 10)
    assert same_bits(small.weight.detach(), (keyed_normal(name_key(1, "weight"), idx) * 0.02).float())
