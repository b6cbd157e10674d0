"""Ling-style model options against hand-written float64 references: explicit head_dim,
QK-norm, partial RoPE, group-limited routing with a routed scaling factor, multi-token
prediction; their parameter counts and config checks.  (Tensor and expert parallelism for
the same options: tests/test_tensor_parallel.py, tests/test_expert_parallel.py.)"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_ufp4.model import GPTModel, ModelConfig
from megatron_ufp4.model.config import PRESETS, upgrade_saved_model
from megatron_ufp4.model.gpt import mtp_targets
from megatron_ufp4.model.params import count_params, num_params
from megatron_ufp4.model.layers import Attention, RotaryEmbedding
from megatron_ufp4.model.linear_factory import LinearFactory
from megatron_ufp4.model.moe import Router
from megatron_ufp4.training.checkpoint import config_differences

pytestmark = pytest.mark.numerical

BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
            max_seq_len=16)
LING_MOE = dict(num_experts=8, moe_top_k=2, moe_ffn_hidden_size=16, router_score="sigmoid", router_groups=4,
                router_topk_groups=2, routed_scaling_factor=2.5, num_shared_experts=1, first_k_dense=1,
                qk_norm=True, rotary_fraction=0.5, head_dim=12, mtp_depth=2)


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw}).validate()


# -- RoPE ------------------------------------------------------------------------------------------
def _rope_reference(x: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Element by element in float64: channels i and i + rotary_dim/2 (i < rotary_dim/2) of
    position p turn by p * theta^(-2i/rotary_dim); channels >= rotary_dim are untouched."""
    out = x.clone()
    half = rotary_dim // 2
    for p in range(x.shape[-2]):
        for i in range(half):
            a = p * theta ** (-2 * i / rotary_dim)
            x1, x2 = x[..., p, i], x[..., p, i + half]
            out[..., p, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., p, i + half] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


@pytest.mark.parametrize("head_dim,rotary_dim", [(8, 8), (12, 6), (16, 8), (8, 2)])
def test_partial_rope_matches_float64_rotation(head_dim, rotary_dim):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, head_dim, dtype=torch.float64)
    rope = RotaryEmbedding(head_dim, 10, 500.0, rotary_dim=rotary_dim)
    got = rope(x)
    # cos/sin are stored in float32 (each within 2^-24 relative), the products then in float64:
    # |error| <= (|x1| + |x2|) * 2^-24 per output, under 1e-6 for these N(0, 1) inputs
    assert (got - _rope_reference(x, rotary_dim, 500.0)).abs().max() < 1e-6
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])  # the unrotated channels pass bit for bit


def test_rotary_dim_must_be_even_and_inside_head_dim():
    for bad in (3, 0, 10):
        with pytest.raises(ValueError, match="rotary_dim"):
            RotaryEmbedding(8, 4, rotary_dim=bad)


# -- attention with QK-norm and an explicit head_dim ---------------------------------------------
def _attention_reference(attn: Attention, x: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """GQA causal attention from the fused qkv weight, written out in float64: per KV group the
    r query heads, key, value (Megatron's layout); QK-norm then partial RoPE; softmax(QK^T/sqrt(d))V."""
    hd, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
    r = nh // nkv
    b, t, _ = x.shape
    qkv = (x @ attn.qkv.weight.double().t()).view(b, t, nkv, (r + 2) * hd)
    q = qkv[..., :r * hd].reshape(b, t, nh, hd)
    k, v = qkv[..., r * hd:(r + 1) * hd], qkv[..., (r + 1) * hd:]

    def rms(z, w):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w.double()

    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q = _rope_reference(q.transpose(1, 2), c.rotary_dim, c.rope_theta)
    k = _rope_reference(k.transpose(1, 2), c.rotary_dim, c.rope_theta)
    v = v.transpose(1, 2)
    out = torch.empty(b, nh, t, hd, dtype=torch.float64)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for h in range(nh):
        s = (q[:, h] @ k[:, h // r].transpose(-1, -2)) / math.sqrt(hd)
        out[:, h] = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, h // r]
    return out.transpose(1, 2).reshape(b, t, nh * hd) @ attn.proj.weight.double().t()


def test_qk_norm_attention_with_explicit_head_dim_matches_reference():
    c = cfg(head_dim=12, qk_norm=True, rotary_fraction=0.5)  # 4 heads x 12 != hidden 32
    torch.manual_seed(1)
    attn = Attention(c, LinearFactory("bf16", 2), 0, RotaryEmbedding(12, 16, c.rope_theta, rotary_dim=6))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()  # norm weights away from 1, so a missing or misplaced weight shows
    attn = attn.double()
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 12, 32) and attn.proj.weight.shape == (32, 4 * 12)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    # float64 throughout except the float32 RoPE tables (bound as in the RoPE test, times the
    # O(10) growth through softmax(.)V and the projection for these N(0, 1) weights)
    assert (attn(attn_x := x) - _attention_reference(attn, attn_x, c)).abs().max() < 1e-5


# -- routing -----------------------------------------------------------------------------------------
def _route_reference(scores, bias, k, groups, topk_groups, norm, scaling):
    """Per token: rank groups by the sum of their two best biased scores, keep the best
    topk_groups, pick the k best biased scores among their experts; weights = the plain
    scores, renormalised, times scaling."""
    n, e = scores.shape
    size = e // groups
    ids, weights = [], []
    for i in range(n):
        biased = [float(scores[i, j].detach() + bias[j]) for j in range(e)]
        gscore = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(groups)]
        keep = sorted(range(groups), key=lambda g: -gscore[g])[:topk_groups]
        allowed = [j for g in keep for j in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda j: -biased[j])[:k]
        w = [float(scores[i, j].detach()) for j in chosen]
        total = sum(w) if norm else 1.0
        ids.append(chosen)
        weights.append([x / total * scaling for x in w])
    return ids, weights


@pytest.mark.parametrize("score,groups,topk_groups,norm,scaling", [
    ("sigmoid", 4, 2, True, 2.5), ("sigmoid", 4, 1, False, 1.0), ("softmax", 2, 1, True, 1.0),
    ("sigmoid", 1, 1, True, 16.0)])
def test_group_limited_routing_matches_reference(score, groups, topk_groups, norm, scaling):
    torch.manual_seed(2)
    router = Router(16, 8, 2, score=score, norm_topk=norm, groups=groups, topk_groups=topk_groups,
                    scaling=scaling).double()
    with torch.no_grad():
        router.linear.weight.normal_()
        router.expert_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(64, 16, dtype=torch.float64)
    weights, idx, scores = router(x)
    ids, ref_w = _route_reference(scores, router.expert_bias, 2, groups, topk_groups, norm, scaling)
    order = idx.sort(dim=-1)
    assert order.values.tolist() == [sorted(r) for r in ids]
    got_w = weights.gather(-1, order.indices)
    ref_sorted = torch.tensor([[w for _, w in sorted(zip(r, ws))] for r, ws in zip(ids, ref_w)],
                              dtype=torch.float64)
    assert (got_w - ref_sorted).abs().max() < 1e-12  # the same float64 values, summed in another order
    if groups > 1 and topk_groups < groups:  # every token stays inside topk_groups groups
        size = 8 // groups
        assert all(len({j // size for j in r}) <= topk_groups for r in idx.tolist())


# -- multi-token prediction ---------------------------------------------------------------------------
def test_mtp_targets_shift_by_hand():
    labels = torch.tensor([[11, 12, 13, 14, 15]])  # tokens t1..t5 (t0 is the first input)
    inp, tgt = mtp_targets(labels, 1)
    assert inp.tolist() == [[11, 12, 13, 14, 15]] and tgt.tolist() == [[12, 13, 14, 15, -100]]
    inp, tgt = mtp_targets(labels, 2)
    assert inp.tolist() == [[12, 13, 14, 15, 0]] and tgt.tolist() == [[13, 14, 15, -100, -100]]
    inp, tgt = mtp_targets(torch.tensor([[3, -100, 4]]), 1)
    assert inp.tolist() == [[3, 0, 4]] and tgt.tolist() == [[-100, 4, -100]]  # ignored labels are no token ids


def test_mtp_loss_value_and_gradient_match_explicit_sum():
    """model(tokens, labels) returns the next-token loss; its backward adds coeff / D * sum_k CE_k,
    CE_k written out here from shifted token lists built by hand."""
    c = cfg(**LING_MOE, mtp_loss_coeff=0.3, aux_loss_coeff=0.0)  # no MoE aux loss in the gradient
    torch.manual_seed(3)
    model = GPTModel(c, init_seed=5).double()
    tokens = torch.randint(0, 64, (2, 12))
    labels = torch.randint(0, 64, (2, 12))
    loss = model(tokens, labels=labels)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    h = model.layer_states(tokens)
    main = F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), labels.flatten())
    seq = [[int(t) for t in row] + [int(y) for y in lab] for row, lab in zip(tokens[:, :1], labels)]  # t0..t12
    mtp = []
    for d, module in enumerate(model.mtp, start=1):
        inputs = torch.tensor([[s[i + d] if i + d < len(s) - 1 else 0 for i in range(12)] for s in seq])
        targets = torch.tensor([[s[i + d + 1] if i + d + 1 < len(s) else -100 for i in range(12)] for s in seq])
        h = module.block(module.proj(torch.cat([module.hidden_norm(h), module.embed_norm(model.embed(inputs))], -1)))
        mtp.append(F.cross_entropy(model.head(module.norm(h)).flatten(0, 1), targets.flatten()))
    # chunked head CE vs full logits in float64: differences at float64 rounding
    assert abs(loss.item() - main.item()) < 1e-12
    assert torch.allclose(model.last_mtp_losses, torch.stack(mtp).detach(), rtol=0, atol=1e-12)
    (main + 0.3 / 2 * sum(mtp)).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-9, atol=1e-12), n
    assert any(got[n].abs().sum() > 0 for n in got if n.startswith("mtp.1."))  # the last depth is trained


def test_mtp_is_training_only_and_does_not_change_the_main_path():
    c = cfg(mtp_depth=1)
    model, plain = GPTModel(c, init_seed=7), GPTModel(cfg(), init_seed=7)
    tokens = torch.randint(0, 64, (2, 8))
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    assert set(shared) == set(plain.state_dict()) and all(torch.equal(v, plain.state_dict()[k])
                                                          for k, v in shared.items() if isinstance(v, torch.Tensor))
    model.eval()
    assert torch.equal(model(tokens), plain(tokens))
    assert torch.equal(model(tokens, labels=tokens), plain(tokens, labels=tokens))


# -- counts and configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True, head_dim=12), dict(mtp_depth=2, tie_embeddings=True),
                                dict(**LING_MOE), {**LING_MOE, "bias": True, "num_shared_experts": 0}])
def test_num_params_equals_built_model(kw):
    c = cfg(**kw)
    assert num_params(c) == count_params(GPTModel(c, init_seed=0))


def test_num_params_by_hand_for_qk_norm_head_dim_and_mtp():
    c = cfg(qk_norm=True, head_dim=12, mtp_depth=1)
    h, hd, f, v = 32, 12, 64, 64
    block = h * (4 + 4) * hd + 4 * hd * h + 2 * hd + 2 * h + 3 * h * f  # qkv, proj, qk-norm, 2 norms, SwiGLU
    expected = 2 * v * h + h + 3 * block + (3 * h + 2 * h * h)  # embed + head, final norm, 2 + 1 blocks, MTP extras
    assert num_params(c).total == expected


def test_presets_document_their_counts():
    """model/config.py's comment lists each preset's num_params; the comment must stay true."""
    import inspect

    from megatron_ufp4.model import config as config_module
    src = inspect.getsource(config_module)
    for name in PRESETS:
        n = num_params(ModelConfig.from_dict({"preset": name}))
        billions = f"{n.total / 1e9:.3f}B"
        assert f"{name}" in src and billions in src, (name, billions)


@pytest.mark.parametrize("kw,field", [
    (dict(head_dim=0), "head_dim"), (dict(hidden_size=30), "num_heads"), (dict(rotary_fraction=0.0), "rotary_fraction"),
    (dict(rotary_fraction=0.1), "rotary_fraction"), (dict(num_experts=8, router_groups=3), "router_groups"),
    (dict(num_experts=8, router_groups=8), "router_groups"),
    (dict(num_experts=8, router_groups=4, router_topk_groups=5), "router_topk_groups"),
    (dict(num_experts=8, moe_top_k=6, router_groups=4, router_topk_groups=2), "router_topk_groups"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"), (dict(mtp_depth=-1), "mtp_depth"),
    (dict(mtp_loss_coeff=-0.1), "mtp_loss_coeff")])
def test_bad_model_options_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field} ") as e:
        cfg(**kw)
    assert "\n" not in str(e.value)


def test_checkpoint_configs_from_before_the_options_compare_equal():
    """A model section saved without the new fields (head_dim resolved from hidden / heads then)
    upgrades to today's defaults: resuming an older run reports no config difference."""
    today = cfg().to_dict()
    old = {k: v for k, v in today.items() if k not in (
        "head_dim", "qk_norm", "rotary_fraction", "router_groups", "router_topk_groups",
        "routed_scaling_factor", "mtp_depth", "mtp_loss_coeff")}
    assert upgrade_saved_model(old) == today
    assert config_differences({"model": old}, {"model": today}, sections=("model",)) == []
    assert config_differences({"model": old}, {"model": {**today, "qk_norm": True}}, sections=("model",)) \
        == ["model.qk_norm: checkpoint has False, config has True"]


def test_head_dim_resolves_and_is_saved():
    assert cfg().head_dim == 8 and cfg(head_dim=12).head_dim == 12
    assert ModelConfig.from_dict({**BASE}).to_dict()["head_dim"] == 8


def test_group_routing_options_compose_with_every_group_split():
    """Each valid (groups, topk_groups) for 8 experts top-2 builds and routes every token to 2
    distinct experts inside its allowed groups."""
    for groups, tg in itertools.product((1, 2, 4), (1, 2, 4)):
        if tg > groups:
            continue
        c = cfg(num_experts=8, moe_top_k=2, router_groups=groups, router_topk_groups=tg, router_score="sigmoid")
        model = GPTModel(c, init_seed=1)
        model(torch.randint(0, 64, (1, 8)))
        for m in model.moe_layers():
            assert int(m.last_load.sum()) == 16
