"""MoE layer: routing, dispatch/combine, aux loss, expert bias, capacity, empty experts,
shared experts, and the aux-loss gradient path."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_ufp4.linear import ExpertLinear, QuantizedLinear
from megatron_ufp4.model import GPTModel, LinearFactory, ModelConfig, MoE, Router
from megatron_ufp4.model.init import KeyedInit

pytestmark = pytest.mark.numerical


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                max_seq_len=64, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32)
    return ModelConfig(**{**base, **kw}).validate()


def make_moe(recipe="bf16", dtype=torch.float64, seed=0, **kw) -> MoE:
    cfg = moe_cfg(**kw)
    torch.manual_seed(seed)
    moe = MoE(cfg, LinearFactory(recipe, cfg.num_layers), layer_index=1)
    moe.init_weights(KeyedInit(moe, seed), 0.2, 0.2)  # large enough that routing and outputs are far from ties
    return moe.to(dtype)


def hand_routed(moe: MoE, scale=10.0):
    """Router weight = identity on the first E input channels: a token c * e_j picks expert j."""
    e, h = moe.num_experts, moe.router.linear.in_features
    with torch.no_grad():
        moe.router.linear.weight.copy_(torch.eye(e, h))
    return moe


def run_expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert ``e`` (global index) alone on ``x``: its own SwiGLU (gate_up, silu(gate) * up, down)."""
    j = moe.experts.indices.index(e)
    gate, up = moe.experts.gate_up.expert_forward(j, x).chunk(2, dim=-1)
    return moe.experts.down.expert_forward(j, F.silu(gate) * up)


def one_hot_tokens(experts, h, scale=10.0, dtype=torch.float64):
    x = torch.zeros(len(experts), h, dtype=dtype)
    for t, e in enumerate(experts):
        x[t, e] = scale
    return x


# -- router ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_router_topk_equals_brute_force(score, norm_topk):
    torch.manual_seed(0)
    router = Router(64, 8, 3, score=score, norm_topk=norm_topk).double()
    with torch.no_grad():
        router.expert_bias.copy_(torch.randn(8) * 0.05)
    x = torch.randn(50, 64, dtype=torch.float64)
    weights, idx, scores = router(x)
    logits = x @ router.linear.weight.T
    if score == "softmax":
        ex = (logits - logits.max(-1, keepdim=True).values).exp()
        ref_scores = ex / ex.sum(-1, keepdim=True)
    else:
        ref_scores = 1 / (1 + (-logits).exp())
    torch.testing.assert_close(scores, ref_scores)
    for t in range(50):  # brute force: sort all experts by biased score, take the first 3
        biased = [(ref_scores[t, e] + router.expert_bias[e]).item() for e in range(8)]
        top = sorted(range(8), key=lambda e: -biased[e])[:3]
        assert sorted(idx[t].tolist()) == sorted(top)
        w = ref_scores[t, top]  # weights: the unbiased scores of the chosen experts
        w = w / w.sum() if norm_topk else w
        got = dict(zip(idx[t].tolist(), weights[t].tolist()))
        assert all(abs(got[e] - wi) < 1e-12 for e, wi in zip(top, w.tolist()))
    ref_idx = torch.topk(ref_scores + router.expert_bias, 3, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)


def test_expert_bias_steers_selection_only():
    moe = hand_routed(make_moe(moe_top_k=1, router_norm_topk=False))
    x = one_hot_tokens([0, 1, 2], 64)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
    weights, idx, scores = moe.router(x)
    assert idx.flatten().tolist() == [3, 3, 3]
    torch.testing.assert_close(weights.flatten(), scores[:, 3])  # weight is the unbiased score


# -- dispatch and combine -------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [0, 1])
def test_dispatch_combine_equals_per_token_loop(shared):
    moe = make_moe(num_shared_experts=shared, moe_top_k=2)
    x = torch.randn(2, 24, 64, dtype=torch.float64)
    out = moe(x)
    x2 = x.reshape(-1, 64)
    weights, idx, _ = moe.router(x2)
    ref = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for j in range(2):
            ref[t] += weights[t, j] * run_expert(moe, int(idx[t, j]), x2[t:t + 1])[0]
        if shared:
            ref[t] += moe.shared(x2[t:t + 1])[0]
    torch.testing.assert_close(out, ref.view_as(x), rtol=1e-12, atol=1e-12)
    assert moe.last_load.tolist() == torch.bincount(idx.flatten(), minlength=4).tolist()
    assert int(moe.last_dropped) == 0


def test_shared_expert_is_added():
    moe = make_moe(num_shared_experts=2)
    assert moe.shared.down.in_features == 2 * 32  # two shared experts = one SwiGLU twice as wide
    x = torch.randn(10, 64, dtype=torch.float64)
    with_shared = moe(x)
    shared, moe.shared = moe.shared, None
    torch.testing.assert_close(with_shared - moe(x), shared(x), rtol=1e-12, atol=1e-12)


# -- load balancing ------------------------------------------------------------------------------------------
def test_aux_loss_hand_made_routing():
    moe = hand_routed(make_moe(moe_top_k=1, aux_loss_coeff=0.1))
    moe(one_hot_tokens([0, 0, 0, 1], 64))
    # softmax of logits (10, 0, 0, 0): the picked expert gets a, each other one b
    a, b = math.exp(10) / (math.exp(10) + 3), 1 / (math.exp(10) + 3)
    f = [3 / 4, 1 / 4, 0, 0]  # fractions of the 4 token-slots
    p = [(3 * a + b) / 4, (a + 3 * b) / 4, b, b]  # mean router probabilities
    expected = 0.1 * 4 * sum(fi * pi for fi, pi in zip(f, p))
    assert abs(float(moe.last_aux_loss) - expected) < 1e-12
    assert moe.last_load.tolist() == [3, 1, 0, 0]


def test_aux_loss_is_coeff_when_probabilities_are_uniform():
    moe = make_moe(aux_loss_coeff=0.05)
    with torch.no_grad():
        moe.router.linear.weight.zero_()  # every probability 1/E, whatever the (tied) top-k picks
    moe(torch.randn(12, 64, dtype=torch.float64))
    assert abs(float(moe.last_aux_loss) - 0.05) < 1e-12


def test_expert_bias_update_direction():
    moe = hand_routed(make_moe(moe_top_k=1, expert_bias_rate=0.1)).train()
    moe(one_hot_tokens([0, 0, 0, 1], 64))
    moe(one_hot_tokens([0, 0, 0, 1], 64))  # loads accumulate: [6, 2, 0, 0], mean 2
    load = moe.update_expert_bias()
    assert load.tolist() == [6, 2, 0, 0]
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
    assert moe.update_expert_bias().tolist() == [0, 0, 0, 0]  # accumulator was reset: no further move
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
    moe.eval()
    moe(one_hot_tokens([0, 0, 0, 1], 64))  # eval forwards do not count
    assert moe.load_accum.sum() == 0
    off = hand_routed(make_moe(moe_top_k=1, expert_bias_rate=0.0)).train()
    off(one_hot_tokens([0, 0, 0, 1], 64))
    off.update_expert_bias()
    assert not off.router.expert_bias.any()


def test_model_update_expert_bias_with_reduce():
    cfg = moe_cfg(expert_bias_rate=0.01, num_layers=3, first_k_dense=1)
    model = GPTModel(cfg, LinearFactory("bf16", 3)).train()
    model(torch.randint(0, 128, (2, 16)))
    loads = model.update_expert_bias(reduce=lambda t: t * 2)
    assert set(loads) == {1, 2} and all(sum(v) == 2 * 2 * 16 * 2 for v in loads.values())
    stats = model.moe_stats()
    assert set(stats) == {1, 2} and sum(stats[1]["load"]) == 2 * 16 * 2 and stats[1]["aux_loss"] > 0


# -- capacity and empty experts --------------------------------------------------------------------------------
def test_capacity_drops_lowest_weight_slots():
    moe = hand_routed(make_moe(moe_top_k=1, router_norm_topk=False, moe_capacity_factor=2.0))
    scales = [1.0, 4.0, 2.0, 3.0]  # all pick expert 0, with increasing weight in this order: 0, 2, 3, 1
    x = torch.zeros(4, 64, dtype=torch.float64)
    x[:, 0] = torch.tensor(scales, dtype=torch.float64)
    assert moe.capacity(4) == 2  # ceil(2.0 * 4 tokens * 1 / 4 experts)
    out = moe(x)
    assert int(moe.last_dropped) == 2 and moe.last_load.tolist() == [4, 0, 0, 0]
    assert not out[[0, 2]].any()  # dropped: only the residual path carries them
    weights, _, _ = moe.router(x)
    for t in (1, 3):
        torch.testing.assert_close(out[t], weights[t, 0] * run_expert(moe, 0, x[t:t + 1])[0])


@pytest.mark.parametrize("recipe", ["bf16", "ufp4"])
def test_expert_with_zero_tokens_forward_backward(recipe):
    moe = hand_routed(make_moe(recipe, dtype=torch.float32, moe_top_k=1, num_shared_experts=1))
    x = one_hot_tokens([0, 0, 0, 1, 0], 64, dtype=torch.float32)
    x = (x + 0.01 * torch.randn_like(x)).requires_grad_()
    out = moe(x)
    assert moe.last_load.tolist() == [4, 1, 0, 0]
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    gate_up, down = moe.experts.gate_up.weight.grad, moe.experts.down.weight.grad
    assert moe.experts.indices == (0, 1, 2, 3)  # slice j of the stacks is expert j
    for e in (0, 1):
        assert torch.isfinite(gate_up[e]).all() and gate_up[e].abs().sum() > 0
        assert torch.isfinite(down[e]).all() and down[e].abs().sum() > 0
    for e in (2, 3):  # never ran: a zero gradient slice (the stacked weight's grad; Megatron-LM's grouped GEMM)
        assert not gate_up[e].any() and not down[e].any()


def test_all_slots_dropped_or_no_tokens():
    moe = make_moe(dtype=torch.float32)
    out = moe(torch.zeros(0, 64))
    assert out.shape == (0, 64) and moe.last_load.tolist() == [0, 0, 0, 0]


def test_experts_follow_recipe():
    moe = make_moe("ufp4", dtype=torch.float32, num_shared_experts=1)
    lins = [m for m in moe.modules() if isinstance(m, QuantizedLinear)]  # the shared expert's
    assert len(lins) == 2 and all(m.quantized and m.recipe.name == "ufp4" for m in lins)
    stacks = [m for m in moe.modules() if isinstance(m, ExpertLinear)]  # routed: gate_up and down, stacked
    assert stacks == [moe.experts.gate_up, moe.experts.down]
    for m in stacks:  # every routed expert's linear: its own GEMM state, quantized by the recipe
        assert m.quantized and m.recipe.name == "ufp4" and m.groupable()
        assert len(m.gemms) == 4 and all(g.recipe == m.recipe for g in m.gemms)
        assert len({g.sr_seed for g in m.gemms}) == 4
    assert not isinstance(moe.router.linear, QuantizedLinear)


# -- the aux loss reaches the gradient, not the output ------------------------------------------------------------
def _moe_model(**kw):
    cfg = moe_cfg(num_layers=3, first_k_dense=1, **kw)
    torch.manual_seed(0)
    return GPTModel(cfg, LinearFactory("bf16", 3)).double()


def test_aux_loss_gradient_reaches_router_with_zero_upstream_gradient():
    model = _moe_model(aux_loss_coeff=0.01)
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        plain = model(tokens)
    logits = model(tokens)
    assert torch.equal(logits, plain)  # the aux loss does not change the output
    logits.backward(torch.zeros_like(logits))
    for i in (1, 2):
        router = model.layers[str(i)].mlp.router.linear.weight
        assert router.grad is not None and router.grad.abs().sum() > 0
    assert model.layers["1"].attn.qkv.weight.grad.abs().sum() > 0  # upstream of layer 2's router
    assert model.head.weight.grad.abs().sum() == 0

    no_aux = _moe_model(aux_loss_coeff=0.0)
    out = no_aux(tokens)
    out.backward(torch.zeros_like(out))
    assert no_aux.layers["1"].mlp.router.linear.weight.grad.abs().sum() == 0


def test_aux_loss_gradient_equals_autograd_of_the_loss_and_scales():
    moe = make_moe(aux_loss_coeff=0.01)
    x = torch.randn(20, 64, dtype=torch.float64)
    out = moe(x)
    out.backward(torch.zeros_like(out))
    got = moe.router.linear.weight.grad.clone()
    moe.router.linear.weight.grad = None
    _, idx, scores = moe.router(x)
    aux = moe.aux_loss(scores, torch.bincount(idx.flatten(), minlength=4))
    (ref,) = torch.autograd.grad(aux, moe.router.linear.weight)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
    moe.step_context.aux_loss_scale = 0.5  # read in forward: scaling afterwards must not change this backward
    moe.router.linear.weight.grad = None
    out = moe(x)
    moe.step_context.aux_loss_scale = 3.0
    out.backward(torch.zeros_like(out))
    torch.testing.assert_close(moe.router.linear.weight.grad, 0.5 * ref, rtol=1e-12, atol=1e-15)
