"""QuantizedLinear: exactness of the high-precision path, wiring of the three FP4 GEMMs,
SR unbiasedness, reproducibility and telemetry."""
import pytest
import torch
import torch.nn.functional as F

from megatron_ufp4.fp4 import RHT, fake_quantize
from megatron_ufp4.fp4.recipes import PRESETS, Recipe
from megatron_ufp4.linear import QuantizedLinear

pytestmark = pytest.mark.numerical

FP4_RECIPES = [n for n in PRESETS if n != "bf16"]


def _run(lin, x, dy):
    x = x.detach().clone().requires_grad_()
    y = lin(x)
    y.backward(dy)
    return y.detach(), x.grad, lin.weight.grad, None if lin.bias is None else lin.bias.grad


@pytest.mark.parametrize("shape", [(32, 64), (2, 16, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_recipe_equals_f_linear_exactly(shape, bias, dtype):
    torch.manual_seed(0)
    lin = QuantizedLinear(64, 48, bias, "bf16", dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    dy = torch.randn(*shape[:-1], 48, dtype=dtype)
    y, dx, dw, db = _run(lin, x, dy)
    w = lin.weight.detach().clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_() if bias else None
    xr = x.clone().requires_grad_()
    yr = F.linear(xr, w, b)
    yr.backward(dy)
    assert torch.equal(y, yr.detach()) and torch.equal(dx, xr.grad) and torch.equal(dw, w.grad)
    if bias:
        assert torch.equal(db, b.grad)


def _reference_gemms(recipe: Recipe, x2, w, dy2, gen_seed):
    """Float64 re-derivation of the three GEMMs from the recipe table, using the quantizer
    on each operand along the reduction axis of its GEMM (axis chosen here, not by the layer)."""
    rht = RHT(recipe.rht_size, recipe.rht_seed)
    g = torch.Generator().manual_seed(gen_seed)

    def q(t, gemm, which, axis):
        spec = recipe.gemm(gemm)
        op = spec.a if which == 0 else spec.b
        tokens = t.shape[axis]
        pad = (-tokens) % max(spec.a.fmt.block, spec.b.fmt.block, rht.size if spec.rht else 1)
        if pad:  # the layer pads the token axis of Wgrad with zeros
            t = F.pad(t.movedim(axis, -1), (0, pad)).movedim(-1, axis)
        return fake_quantize(t, op.fmt, axis, op.rounding, rht if spec.rht else None, g).double()

    y = q(x2, "fprop", 0, 1) @ q(w, "fprop", 1, 1).T
    dx = q(dy2, "dgrad", 0, 1) @ q(w, "dgrad", 1, 0)  # W blocked along out_features
    dw = q(dy2, "wgrad", 0, 0).T @ q(x2, "wgrad", 1, 0)  # both blocked along tokens
    return y, dx, dw


@pytest.mark.parametrize("recipe", FP4_RECIPES)
@pytest.mark.parametrize("tokens", [64, 40])  # 40: Wgrad's token axis needs zero padding
def test_fp4_gemms_follow_the_recipe(recipe, tokens):
    torch.manual_seed(1)
    r = Recipe.preset(recipe)
    lin = QuantizedLinear(64, 96, False, r, sr_seed=7)
    x, dy = torch.randn(tokens, 64), torch.randn(tokens, 96)
    y, dx, dw, _ = _run(lin, x, dy)
    ry, rdx, rdw = _reference_gemms(r, x, lin.weight.detach(), dy, 7)
    # same quantized operands; only fp32-vs-fp64 accumulation differs
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), rdw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", FP4_RECIPES)
def test_fp4_error_is_bounded_against_float64(recipe):
    torch.manual_seed(2)
    lin = QuantizedLinear(128, 64, True, recipe, sr_seed=3)
    x, dy = torch.randn(4, 32, 128), torch.randn(4, 32, 64)
    y, dx, dw, db = _run(lin, x, dy)
    w = lin.weight.detach().double().requires_grad_()
    b = lin.bias.detach().double().requires_grad_()
    xr = x.double().requires_grad_()
    yr = F.linear(xr, w, b)
    yr.backward(dy.double())

    def rel(a, ref):
        return ((a.double() - ref).norm() / ref.norm()).item()

    # 4-bit operands have NMSE ~1% each (SQNR ~20 dB): a GEMM's relative error ~0.1-0.2
    assert 0.01 < rel(y, yr.detach()) < 0.3
    assert 0.01 < rel(dx, xr.grad) < 0.3
    assert 0.01 < rel(dw, w.grad) < 0.3
    torch.testing.assert_close(db.double(), b.grad, rtol=1e-5, atol=1e-5)  # bias grad stays exact


def test_dy_stochastic_rounding_is_unbiased():
    """Averaging Dgrad over many SR draws converges to dY (unquantized) times the quantized W."""
    torch.manual_seed(3)
    r = Recipe.from_dict({"name": "ufp4", "rht": False})  # SR on dy, RTNE on w
    lin = QuantizedLinear(32, 32, False, r, sr_seed=11)
    x, dy = torch.randn(16, 32), torch.randn(16, 32)
    wq = fake_quantize(lin.weight.detach(), "int4", axis=0).double()
    expected = dy.double() @ wq
    n = 400
    acc = torch.zeros(16, 32, dtype=torch.float64)
    sq = torch.zeros(16, 32, dtype=torch.float64)
    for _ in range(n):
        xg = x.clone().requires_grad_()
        lin(xg).backward(dy)
        acc += xg.grad.double()
        sq += xg.grad.double() ** 2
    mean = acc / n
    std_err = ((sq / n - mean**2).clamp(min=0) / n).sqrt()
    # each entry within 5 standard errors, and the average error far below one draw's error
    assert bool(((mean - expected).abs() <= 5 * std_err + 1e-6).all())
    one_draw = (xg.grad.double() - expected).norm()
    assert (mean - expected).norm() < one_draw / 5
    rtne = Recipe.from_dict({"name": "ufp4", "rht": False, "sr": []})
    lin_rtne = QuantizedLinear(32, 32, False, rtne)
    lin_rtne.weight.data.copy_(lin.weight.data)
    xg = x.clone().requires_grad_()
    lin_rtne(xg).backward(dy)
    assert (mean - expected).norm() < (xg.grad.double() - expected).norm()


def test_sr_draws_reproducible_and_restored_from_state_dict():
    torch.manual_seed(4)
    a = QuantizedLinear(64, 64, True, "ufp4", sr_seed=5)
    b = QuantizedLinear(64, 64, True, "ufp4", sr_seed=5)
    b.load_state_dict(a.state_dict())
    x, dy = torch.randn(32, 64), torch.randn(32, 64)
    ga = _run(a, x, dy)
    a.weight.grad = None
    gb = _run(b, x, dy)
    b.weight.grad = None
    assert all(torch.equal(p, q) for p, q in zip(ga[1:3], gb[1:3]))
    saved = a.state_dict()
    first = _run(a, x, dy)
    a.weight.grad = None
    a.load_state_dict(saved)  # rewinds the SR generator
    again = _run(a, x, dy)
    assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])
    c = QuantizedLinear(64, 64, True, "ufp4", sr_seed=6)
    c.load_state_dict({k: v for k, v in saved.items() if k != "_extra_state"}, strict=False)
    assert not torch.equal(_run(c, x, dy)[1], again[1])


def test_high_precision_layers_run_f_linear_and_telemetry_says_so():
    r = Recipe.from_dict({"name": "ufp4", "bf16_last": 1})
    last = QuantizedLinear(32, 32, False, r, layer_index=3, num_layers=4)
    mid = QuantizedLinear(32, 32, False, r, layer_index=1, num_layers=4)
    x = torch.randn(16, 32)
    assert torch.equal(last(x), F.linear(x, last.weight))
    assert not torch.equal(mid(x), F.linear(x, mid.weight))
    assert "high precision" in last.telemetry()["fprop"]["ran"]
    t = mid.telemetry()["fprop"]
    assert t["ran"] == {"x": "int4 1x16 fp32 rtne", "w": "int4 1x16 fp32 rtne"} and t["rht"] == "16"


def test_telemetry_stats_report_alpha_and_nmse():
    torch.manual_seed(5)
    lin = QuantizedLinear(64, 64, False, "e2m1_ref", collect_stats=True)
    x = torch.randn(64, 64, requires_grad=True)
    lin(x).sum().backward()
    tel = lin.telemetry()
    assert set(tel) == {"fprop", "dgrad", "wgrad"}
    sx = tel["fprop"]["stats"]["x"]
    assert 0.9 < sx["alpha"] < 1.0  # E2M1 shrinks (alpha < 1) on Gaussian data
    assert 0.001 < sx["nmse"] < 0.05 and sx["amax"] == pytest.approx(x.detach().abs().max().item())
    assert tel["dgrad"]["ran"]["dy"].endswith(" sr") and tel["wgrad"]["rht"] == "16"


def test_nonfinite_input_propagates_as_nan():
    lin = QuantizedLinear(32, 16, False, "ufp4")
    x = torch.randn(16, 32)
    x[3, 5] = float("inf")
    y = lin(x)
    assert torch.isnan(y[3]).all() and torch.isfinite(y[torch.arange(16) != 3]).all()


def test_autocast_bf16_output_dtype():
    lin = QuantizedLinear(32, 16, True, "ufp4")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(torch.randn(16, 32))
    assert y.dtype == torch.bfloat16


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="in_features.*|reduces over 40"):
        QuantizedLinear(40, 32, recipe="ufp4")
    with pytest.raises(ValueError, match="backend"):
        QuantizedLinear(32, 32, recipe="ufp4", backend="nope")
    QuantizedLinear(40, 24, recipe="bf16")  # high precision has no block constraint


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ufp4", "nvfp4", "ufp4_nv"])
def test_fused_backend_is_bitwise_equal_to_emulated(recipe):
    """The torch.compile'd quantizer must produce the same bits as the eager reference."""
    torch.manual_seed(6)
    ref = QuantizedLinear(64, 32, True, recipe, sr_seed=9)
    fused = QuantizedLinear(64, 32, True, recipe, sr_seed=9, backend="fused")
    fused.load_state_dict(ref.state_dict())
    x, dy = torch.randn(2, 24, 64), torch.randn(2, 24, 32)
    for a, b in zip(_run(ref, x, dy), _run(fused, x, dy)):
        assert torch.equal(a, b)


def test_step_context_is_per_model_and_read_in_forward():
    """SR keys come from the position the layer's own StepContext had at *forward* time: two
    models in one process, or a backward that runs after other forwards and a position
    change (a pipeline schedule), get exactly the draws of running each alone, in order."""
    recipe = {"name": "ufp4", "sr": ["x", "dy"]}  # SR in forward and backward GEMMs
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    dy = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))

    def layer():
        torch.manual_seed(3)
        return QuantizedLinear(64, 32, True, recipe, sr_seed=11)

    def alone(step, micro):
        lin = layer()
        lin.step_context.at(step, micro)
        return _run(lin, x, dy)

    a, b = layer(), layer()  # separate models: separate contexts
    a.step_context.at(5, 0)
    b.step_context.at(9, 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    a.step_context.at(7, 3)  # the next micro-batch's forward is set up before this backward runs
    ya.backward(dy)
    yb.backward(dy)
    for got, ref in ((ya, xa, a), alone(5, 0)), ((yb, xb, b), alone(9, 1)):
        y, xg, lin = got
        assert torch.equal(y.detach(), ref[0]) and torch.equal(xg.grad, ref[1]) and torch.equal(lin.weight.grad, ref[2])
    other = alone(7, 3)  # and the position does matter: another one draws other noise
    assert not torch.equal(other[2], alone(5, 0)[2])
