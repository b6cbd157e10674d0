"""Routed experts, stacked, as grouped GEMMs (model/experts.py, linear/expert_linear.py,
linear/grouped.py, fp4/grouped.py): bitwise the per-expert loop and separate per-expert
linears for every recipe, forward and every gradient, with uneven counts, experts without
tokens and token counts that are not whole blocks."""
import copy

import pytest
import torch

from megatron_ufp4.fp4.formats import make_format
from megatron_ufp4.fp4.grouped import Segments, fake_quantize_grouped, grouped_tensor_amax
from megatron_ufp4.fp4.hadamard import RHT
from megatron_ufp4.fp4.quantize import fake_quantize, tensor_amax
from megatron_ufp4.fp4.recipes import PRESETS
from megatron_ufp4.linear.backends import grouped_mm
from megatron_ufp4.model import LinearFactory, ModelConfig, MoE
from megatron_ufp4.model.expert_keys import per_expert_views, stack_experts, unstack_experts
from megatron_ufp4.model.placement import named_placements
from megatron_ufp4.model.experts import GroupedExperts
from megatron_ufp4.model.init import KeyedInit

pytestmark = pytest.mark.numerical

RECIPES = list(PRESETS) + [{"name": "ufp4", "sr": ["x", "w", "dy"]}, {"name": "nvfp4", "sr": ["x", "w", "dy"]},
                           {"name": "mxfp4", "sr": ["x", "w", "dy"]}]
COUNTS = [5, 0, 1, 17, 0, 33, 2, 6]  # uneven, empty experts, not whole blocks (16 / 32)


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def same(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(bits(a), bits(b)))


def make_moe(recipe, bias=False, backend="emulated", num_experts=8):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      max_seq_len=16, num_experts=num_experts, moe_top_k=2, moe_ffn_hidden_size=32,
                      bias=bias).validate()
    moe = MoE(cfg, LinearFactory(recipe, cfg.num_layers, backend=backend, seed=3), layer_index=1)
    moe.init_weights(KeyedInit(moe, 7), 0.2, 0.2)
    if bias:
        with torch.no_grad():
            for p in moe.parameters():
                if p.dim() == 1 and p.numel() > 8:
                    p.copy_(torch.randn_like(p) * 0.1)
    return moe


def run(experts: GroupedExperts, xs, counts, dy, loop: bool):
    x = xs.clone().requires_grad_(True)
    y = experts.forward_loop(x, counts) if loop else experts(x, counts)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in experts.named_parameters()}


def compare(experts, xs, counts, dy):
    ref_experts = copy.deepcopy(experts)  # same weights and SR generator states, separate grads
    got = run(experts, xs, counts, dy, loop=False)
    ref = run(ref_experts, xs, counts, dy, loop=True)
    assert same(got[0], ref[0]), "forward"
    assert same(got[1], ref[1]), "dX"
    assert got[2].keys() == ref[2].keys()
    for n in ref[2]:
        assert same(got[2][n], ref[2][n]), n
    return got, ref


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r if isinstance(r, str) else f"{r['name']}-sr-all")
@pytest.mark.parametrize("position", [None, (4, 1)], ids=["generator-keys", "derived-keys"])
def test_grouped_equals_loop_bitwise(recipe, position):
    moe = make_moe(recipe)
    moe.step_context.at(*(position or (None,)))
    torch.manual_seed(0)
    xs = torch.randn(sum(COUNTS), 64)
    dy = torch.randn(sum(COUNTS), 64)
    got, _ = compare(moe.experts, xs, COUNTS, dy)
    for e, n in enumerate(COUNTS):  # no rows: a zero gradient (the loop's too)
        assert bool(got[2]["gate_up.weight"][e].any()) == (n > 0)
    if position is None and recipe != "bf16":  # generator keys: the next draws are in step too
        moe.zero_grad(set_to_none=True)
        compare(moe.experts, xs, COUNTS, dy)


@pytest.mark.parametrize("recipe", ["ufp4", {"name": "nvfp4", "sr": ["x", "w", "dy"]}, "mxfp4"],
                         ids=["ufp4", "nvfp4-sr-all", "mxfp4"])
def test_grouped_quantizer_in_row_chunks(recipe, monkeypatch):
    """Operands larger than one quantizer pass run in row chunks: the same bits."""
    import megatron_ufp4.fp4.grouped as grouped

    monkeypatch.setattr(grouped, "_CHUNK", 16 * 64)  # 16 rows of 64, 2-D blocks too
    moe = make_moe(recipe)
    moe.step_context.at(3, 0)
    torch.manual_seed(8)
    xs, dy = torch.randn(sum(COUNTS), 64), torch.randn(sum(COUNTS), 64)
    compare(moe.experts, xs, COUNTS, dy)


@pytest.mark.parametrize("recipe", ["ufp4", "nvfp4"])
def test_grouped_with_bias_and_bf16_autocast(recipe):
    moe = make_moe({"name": recipe, "sr": ["x", "w", "dy"]}, bias=True)
    torch.manual_seed(1)
    xs, dy = torch.randn(sum(COUNTS), 64), torch.randn(sum(COUNTS), 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = compare(moe.experts, xs, COUNTS, dy)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32


def test_fused_backend_grouped_equals_emulated_loop():
    moe = make_moe({"name": "ufp4", "sr": ["x", "w", "dy"]}, backend="fused")
    moe.step_context.at(1, 0)
    ref = make_moe({"name": "ufp4", "sr": ["x", "w", "dy"]})
    ref.step_context.at(1, 0)
    torch.manual_seed(2)
    xs, dy = torch.randn(sum(COUNTS), 64), torch.randn(sum(COUNTS), 64)
    got = run(moe.experts, xs, COUNTS, dy, loop=False)
    want = run(ref.experts, xs, COUNTS, dy, loop=True)
    assert same(got[0], want[0]) and same(got[1], want[1])
    assert all(same(got[2][n], want[2][n]) for n in want[2])


def test_no_rows_and_moe_layer_equal_loop():
    moe = make_moe("ufp4")
    assert moe.experts(torch.zeros(0, 64), [0] * 8) is None
    ref = copy.deepcopy(moe)
    ref.experts.forward = ref.experts.forward_loop  # the whole layer through the reference loop
    torch.manual_seed(3)
    x = torch.randn(2, 7, 64)
    out, out_ref = moe(x), ref(x)
    assert same(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (n, p), q in zip(moe.named_parameters(), ref.parameters()):
        assert same(p.grad, q.grad), n


def separate_experts(moe, factory):
    """The layer's experts as earlier versions built them: one SwiGLU of two linears per
    expert, named ``mlp.experts.<e>.*`` (their SR seeds), with the stacked weights' values."""
    out = []
    for j, e in enumerate(moe.experts.indices):
        pair = []
        for proj, (i, o, kind, parts) in (("gate_up", (64, 64, "column", 2)), ("down", (32, 64, "row", 1))):
            lin = factory(i, o, kind=kind, layer_index=1, name=f"mlp.experts.{e}.{proj}", parts=parts, in_moe=True)
            with torch.no_grad():
                lin.weight.copy_(getattr(moe.experts, proj).weight[j])
            pair.append(lin)
        out.append(pair)
    return out


@pytest.mark.parametrize("recipe", ["ufp4", "nvfp4", "e2m1_ref", {"name": "ufp4", "sr": ["x", "w", "dy"]}],
                         ids=["ufp4", "nvfp4", "e2m1_ref", "ufp4-sr-all"])
def test_stacked_experts_equal_separate_linears(recipe):
    """The independent reference: a separate linear per expert (earlier versions' layout),
    each on its rows; the stacked layer's output, dX and each expert's dW equal theirs."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      max_seq_len=16, num_experts=8, moe_top_k=2, moe_ffn_hidden_size=32).validate()
    factory = LinearFactory(recipe, cfg.num_layers, seed=3)
    moe = MoE(cfg, factory, layer_index=1)
    moe.init_weights(KeyedInit(moe, 7), 0.2, 0.2)
    factory.step_context.at(2, 1)
    sep = separate_experts(moe, factory)
    torch.manual_seed(11)
    xs, dy = torch.randn(sum(COUNTS), 64), torch.randn(sum(COUNTS), 64)
    got = run(moe.experts, xs, COUNTS, dy, loop=False)
    x = xs.clone().requires_grad_(True)
    outs = []
    for (gate_up, down), chunk in zip(sep, x.split(COUNTS)):
        if chunk.shape[0]:
            gate, up = gate_up(chunk).chunk(2, dim=-1)
            outs.append(down(torch.nn.functional.silu(gate) * up))
    y = torch.cat(outs)
    y.backward(dy)
    assert same(got[0], y.detach()) and same(got[1], x.grad)
    for j, ((gate_up, down), n) in enumerate(zip(sep, COUNTS)):
        for proj, lin in (("gate_up", gate_up), ("down", down)):
            stacked_grad = got[2][f"{proj}.weight"][j]
            assert same(stacked_grad, lin.weight.grad) if n else (lin.weight.grad is None and not stacked_grad.any())


def test_experts_are_two_stacked_parameters():
    moe = make_moe("ufp4", bias=True)
    names = {n: tuple(p.shape) for n, p in moe.experts.named_parameters()}
    assert names == {"gate_up.weight": (8, 64, 64), "gate_up.bias": (8, 64), "down.weight": (8, 64, 32),
                     "down.bias": (8, 64)}
    assert not [m for m in moe.experts.modules() if type(m).__name__ in ("SwiGLU", "QuantizedLinear")]
    moe = moe.double().float()  # _apply keeps one tensor per stack
    assert moe.experts.gate_up.weight.shape == (8, 64, 64)
    kept = moe.experts.gate_up.weight.detach()[2:4].clone()
    moe.experts.select([2, 3])  # an EP shard: its own (2, ...) tensors, experts' global indices kept
    assert moe.experts.indices == (2, 3) and torch.equal(moe.experts.gate_up.weight, kept)
    assert [g.sr_seed for g in moe.experts.gate_up.gemms] == \
        [LinearFactory("ufp4", 2, seed=3).sr_seed(1, f"mlp.experts.{e}.gate_up") for e in (2, 3)]
    assert named_placements(moe)["experts.down.weight"].experts == (2, 3)


def test_state_dict_is_stacked_and_its_per_expert_form_round_trips():
    moe = make_moe("nvfp4")
    sd = moe.state_dict()
    assert sd["experts.gate_up.weight"].shape == (8, 64, 64) and sorted(sd["experts.down._extra_state"]) == \
        list(range(8))
    per = unstack_experts(sd, named_placements(moe))  # the checkpoint key form: one key per expert
    assert torch.equal(per["experts.5.gate_up.weight"], sd["experts.gate_up.weight"][5])
    assert set(per["experts.5.down._extra_state"]) == {"sr_generator", "rht_signs"}
    back = stack_experts(per)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items() if torch.is_tensor(v))
    other = make_moe("nvfp4")
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(back)
    torch.manual_seed(4)
    xs, dy = torch.randn(sum(COUNTS), 64), torch.randn(sum(COUNTS), 64)
    a, b = run(moe.experts, xs, COUNTS, dy, False), run(other.experts, xs, COUNTS, dy, False)
    assert same(a[0], b[0]) and same(a[1], b[1])
    with pytest.raises(ValueError, match="extra state for experts"):
        other.experts.gate_up.set_extra_state({0: sd["experts.gate_up._extra_state"][0]})


def test_optimizer_step_updates_every_expert_as_megatron_does():
    """A stacked expert without tokens has a zero gradient: AdamW moves it by weight decay
    only (Megatron-LM's grouped GEMM; separate Parameters with no gradient were skipped)."""
    moe = make_moe("ufp4")
    lr, wd = 1e-2, 0.1
    opt = torch.optim.AdamW(moe.parameters(), lr=lr, weight_decay=wd)
    torch.manual_seed(5)
    xs = torch.randn(sum(COUNTS), 64)
    moe.experts(xs, COUNTS).sum().backward()
    before = moe.experts.gate_up.weight.detach().clone()
    opt.step()
    after = moe.experts.gate_up.weight
    for e, n in enumerate(COUNTS):
        decayed = before[e] * (1 - lr * wd)  # AdamW's decoupled decay, then a zero Adam step
        assert torch.equal(after[e], decayed) == (n == 0), e


# -- the grouped quantizer and GEMM on their own -------------------------------------------------------
@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4", "nvfp4-2d"])
@pytest.mark.parametrize("rounding", ["rtne", "sr"])
def test_grouped_quantize_equals_each_group_alone(fmt, rounding):
    f = make_format("nvfp4", block_2d=True) if fmt == "nvfp4-2d" else make_format(fmt)
    rht = RHT(32 if f.block == 32 else 16, 1)
    torch.manual_seed(6)
    cases = [(0, [16, 0, 32])] if f.block_2d else [(0, [3, 0, 1, 16, 5]), (1, [32, 0, f.block, 64])]
    for axis, sizes in cases:
        parts = [torch.randn(s, 64) * (i + 1) for i, s in enumerate(sizes)] if axis == 0 else \
            [torch.randn(16, s) * (i + 1) for i, s in enumerate(sizes)]
        x = torch.cat(parts, axis)
        keys = [101 + i for i in range(len(sizes))]
        seg = Segments(axis, tuple(sizes))
        got = fake_quantize_grouped(x, f, seg, rounding, rht, keys=keys)
        want = torch.cat([fake_quantize(p, f, -1, rounding, rht, sr_key=k, nonfinite="propagate") if p.numel() else p
                          for p, k in zip(parts, keys)], axis)
        assert same(got, want), (axis, sizes)
        if f.scale == "e4m3":
            amax = grouped_tensor_amax(x, f, rht, seg)
            assert [float(a) for a in amax] == [float(tensor_amax(p, f, rht)) if p.numel() else 0.0 for p in parts]


def test_grouped_quantize_refuses_groups_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="pad each group"):
        fake_quantize_grouped(torch.randn(4, 48), "e2m1", Segments(1, (8, 40)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grouped_mm_equals_per_group_mm(dtype):
    torch.manual_seed(7)
    sizes = [3, 0, 7, 1, 16]
    a, b = torch.randn(sum(sizes), 64, dtype=dtype), torch.randn(5, 48, 64, dtype=dtype)
    starts = [sum(sizes[:i]) for i in range(5)]
    want = torch.cat([a[s:s + n] @ b[g].T for g, (s, n) in enumerate(zip(starts, sizes))])
    assert torch.equal(grouped_mm(a, b, sizes), want)
    padded = [16, 0, 32, 16, 16]
    a2, b2 = torch.randn(24, sum(padded), dtype=dtype), torch.randn(40, sum(padded), dtype=dtype)
    st = [sum(padded[:i]) for i in range(5)]
    got = grouped_mm(a2, b2, padded)
    for g, (s, n) in enumerate(zip(st, padded)):  # each group against contiguous operands, as the loop has them
        assert torch.equal(got[g], a2[:, s:s + n].contiguous() @ b2[:, s:s + n].contiguous().T)


# -- tensor and expert parallelism (two gloo ranks) -----------------------------------------------------
def _flat(o):
    return {"y": o[0], "dx": o[1], **{n: g for n, g in o[2].items()}}


def _parallel_checks(rank, world):
    from megatron_ufp4.parallel import build_parallel_state
    from megatron_ufp4.parallel.expert import build_expert_parallel_model
    from megatron_ufp4.parallel.parallel_factory import ParallelLinearFactory

    out = {}
    # TP=2: each rank's sharded experts, grouped vs loop (SR indices of strided [gate; up] parts,
    # TP-reduced tensor amax, part-split GEMMs)
    st = build_parallel_state(tp=2)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      max_seq_len=16, num_experts=8, moe_top_k=2, moe_ffn_hidden_size=32).validate()
    for name, recipe in (("ufp4-sr-all", {"name": "ufp4", "sr": ["x", "w", "dy"]}),
                         ("nvfp4-sr-all", {"name": "nvfp4", "sr": ["x", "w", "dy"]}), ("e2m1_ref", "e2m1_ref")):
        moe = MoE(cfg, ParallelLinearFactory(recipe, 2, st, seed=3), layer_index=1)
        moe.init_weights(KeyedInit(moe, 7), 0.2, 0.2)
        moe.step_context.at(2, 1)
        torch.manual_seed(0)
        xs, dy = torch.randn(sum(COUNTS), 64), torch.randn(sum(COUNTS), 64)
        ref = copy.deepcopy(moe.experts)
        got, want = _flat(run(moe.experts, xs, COUNTS, dy, False)), _flat(run(ref, xs, COUNTS, dy, True))
        out[f"tp_{name}"] = [k for k in want if not same(got[k], want[k])]
    # EP=2: the GPT model's forward/backward with each rank's expert shard, grouped vs loop
    st = build_parallel_state(ep=2)
    mcfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                       max_seq_len=16, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32).validate()
    from megatron_ufp4.model import GPTModel
    for kind in ("alltoall", "allgather"):
        grads = []
        for loop in (False, True):
            torch.manual_seed(0)
            m = build_expert_parallel_model(GPTModel(mcfg, LinearFactory({"name": "ufp4", "sr": ["x", "w", "dy"]},
                                                                         2, seed=3)), st, kind)
            for moe in m.moe_layers():
                if loop:
                    moe.experts.forward = moe.experts.forward_loop
            m.step_context.at(1, rank)
            tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))
            m(tokens).float().square().mean().backward()
            grads.append({n: p.grad for n, p in m.named_parameters()})
        out[f"ep_{kind}"] = [n for n in grads[1] if not same(grads[0][n], grads[1][n])]
        out[f"ep_{kind}_experts"] = sorted({str(e) for moe in m.moe_layers() for e in moe.experts.indices})
    return out


@pytest.mark.slow
def test_tensor_and_expert_parallel_grouped_equals_loop():
    from dist_utils import run_ranks

    for rank, o in enumerate(run_ranks(2, _parallel_checks)):
        for k, v in o.items():
            if k.endswith("_experts"):
                assert v == [str(2 * rank), str(2 * rank + 1)], (rank, k, v)
            else:
                assert v == [], (rank, k, v)


# -- earlier versions' optimizer state, stacked -----------------------------------------------------------
def test_stacking_optimizer_state_fills_experts_earlier_versions_kept_none_for():
    """Earlier versions kept no AdamW state for an expert that never got a token: with the
    stack's shape, such an expert (in the middle or last) gets AdamW's fresh state; without
    it, a gap is one error, never a stack of the wrong size."""
    from megatron_ufp4.model.expert_keys import stack_expert_optimizer

    def st(v, step):
        return {"exp_avg": torch.full((2, 3), float(v)), "exp_avg_sq": torch.full((2, 3), float(v) + 1),
                "step": torch.tensor(float(step))}

    for held in ([0, 2], [0, 1]):  # expert 1 missing; the last expert (2) missing
        states = {f"l.experts.{e}.gate_up.weight": st(e + 1, 5) for e in held}
        out = stack_expert_optimizer(states, {"l.experts.gate_up.weight": (3, 2, 3)})["l.experts.gate_up.weight"]
        assert out["exp_avg"].shape == (3, 2, 3) and float(out["step"]) == 5
        for e in range(3):
            assert float(out["exp_avg"][e, 0, 0]) == (e + 1 if e in held else 0.0)
            assert float(out["exp_avg_sq"][e, 0, 0]) == (e + 2 if e in held else 0.0)
    with pytest.raises(ValueError, match="optimizer state of experts"):
        stack_expert_optimizer({f"l.experts.{e}.down.weight": st(e, 1) for e in (0, 2)})


def test_numbered_optimizer_of_one_expert_per_layer_reads_the_earlier_layout():
    """With one expert per layer the two numbered layouts have equal group sizes; the saved
    shapes (the earlier version's per-expert (out, in)) choose the per-expert one."""
    from megatron_ufp4.model import GPTModel
    from megatron_ufp4.training.checkpoint_formats import _optimizer_by_name

    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      max_seq_len=16, num_experts=1, moe_top_k=1, moe_ffn_hidden_size=32).validate()
    model = GPTModel(cfg, LinearFactory("bf16", 2), init_seed=0)
    named = [(n, tuple(v.shape)) for n, v in per_expert_views(model.named_parameters(), named_placements(model))]
    order = [n for n, s in named if len(s) >= 2] + [n for n, s in named if len(s) < 2]
    shape = dict(named)
    state = {i: {"exp_avg": torch.full(shape[n], 0.5), "exp_avg_sq": torch.ones(shape[n]), "step": torch.tensor(3.0)}
             for i, n in enumerate(order)}
    n_mat = sum(1 for _, s in named if len(s) >= 2)
    opt = {"state": state, "param_groups": [{"params": list(range(n_mat))}, {"params": list(range(n_mat, len(order)))}]}
    out = _optimizer_by_name({"optimizer": opt}, None, model, "f")
    w = dict(model.named_parameters())["layers.1.mlp.experts.gate_up.weight"]
    assert out["layers.1.mlp.experts.gate_up.weight"]["exp_avg"].shape == w.shape == (1, 64, 64)
