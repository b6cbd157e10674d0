"""CUDA: QuantizedLinear (every recipe) and grouped expert linears on the device against the
CPU, and SR state in checkpoints across devices.  Shared setup: cuda_common.py."""
from __future__ import annotations

import io

import pytest
import torch

from cuda_common import (CUDA_MARKS, REC, RECIPES, U32, assert_bits_equal, assert_within_bound,
                         device_under_test, dyadic, gemm_error_bound, recorder)
from cuda_common import ieee_fp32_matmul, recording_backend  # noqa: F401 (autouse fixtures)
from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.linear import QuantizedLinear

pytestmark = CUDA_MARKS


# -- 2. QuantizedLinear forward + backward -------------------------------------------------------
IN, OUT, BATCH, SEQ = 64, 32, 2, 16  # every dim a multiple of 32 (MXFP4 blocks, NVFP4 16x16 weights)


def _exact_rht_recipe(name: str) -> dict:
    """The preset, with a size-16 RHT where it uses a bigger one (see the module docstring)."""
    spec = {"name": name}
    if Recipe.preset(name).rht_size != 16:
        spec["rht_size"] = 16
    return spec


def _make_linear(spec, device, sr_seed=7, backend=REC, weights=None):
    m = QuantizedLinear(IN, OUT, bias=True, recipe=spec, sr_seed=sr_seed, backend=backend, device=device)
    if weights is not None:
        with torch.no_grad():
            m.weight.copy_(weights[0])
            m.bias.copy_(weights[1])
    return m


def _run_linear(m, x, dy, position):
    """One forward + backward; returns (outputs, recorded GEMM calls)."""
    rec = recorder()
    if position is None:
        m.step_context.at(None)  # outside training: SR keys come from the module's generator
    else:
        m.step_context.at(*position)  # in training: keys derived from (seed, step, micro-batch)
    xg = x.detach().to(m.weight.device, copy=True).requires_grad_(True)  # a fresh leaf per run
    m.zero_grad(set_to_none=True)
    y = m(xg)
    y.backward(dy.to(y.device))
    m.step_context.at(None)
    out = {"y": y.detach(), "dx": xg.grad, "dw": m.weight.grad, "db": m.bias.grad}
    return {k: v.detach().cpu() for k, v in out.items()}, rec.take()


def _check_outputs_against_operands(out, calls, x, dy, weight, bias, what):
    """Each GEMM output within the fp32 bound of a float64 GEMM of its own quantized operands."""
    if not calls:  # high precision (F.linear): the operands are the inputs themselves
        x2, dy2 = x.reshape(-1, IN), dy.reshape(-1, OUT)
        calls = [{"a": x2, "b": weight}, {"a": dy2, "b": weight.T}, {"a": dy2.T, "b": x2.T}]
    fprop, dgrad, wgrad = calls
    ref = fprop["a"].double() @ fprop["b"].double().T + bias.double()
    # the bias is one more term of the same sum: gamma_(K+1) * (|A| @ |B|^T + |bias|)
    k1 = fprop["a"].shape[-1] + 1
    bound = (k1 * U32 / (1 - k1 * U32)) * (fprop["a"].double().abs() @ fprop["b"].double().abs().T
                                           + bias.double().abs()) + k1 * 2.0 ** -149
    assert_within_bound(out["y"].reshape(-1, OUT), ref, bound, f"{what}: fprop y")
    assert_within_bound(out["dx"].reshape(-1, IN), dgrad["a"].double() @ dgrad["b"].double().T,
                        gemm_error_bound(dgrad["a"], dgrad["b"]), f"{what}: dgrad dx")
    assert_within_bound(out["dw"], wgrad["a"].double() @ wgrad["b"].double().T,
                        gemm_error_bound(wgrad["a"], wgrad["b"]), f"{what}: wgrad dw")
    dy2 = dy.reshape(-1, OUT).double()
    t = dy2.shape[0]
    assert_within_bound(out["db"], dy2.sum(0), (t * U32 / (1 - t * U32)) * dy2.abs().sum(0) + t * 2.0 ** -149,
                        f"{what}: bias grad")


@pytest.mark.parametrize("position", [None, (5, 1)], ids=["generator-keys", "step-keys"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_quantized_linear_matches_cpu(recipe, position):
    """Forward + backward of one linear on the device and on the CPU, same weights, inputs and SR
    keys: every quantized GEMM operand bitwise equal, every output within the fp32 GEMM bound of
    the float64 product of its operands (on both devices)."""
    spec = _exact_rht_recipe(recipe)
    weights = (dyadic((OUT, IN), 10, 7), dyadic((OUT,), 11, 7))
    x, dy = dyadic((BATCH, SEQ, IN), 12, 6), dyadic((BATCH, SEQ, OUT), 13, 8)
    cpu = _make_linear(spec, "cpu", weights=weights)
    # the same sr_seed: step keys derive from it (the factory's in training)
    dev = _make_linear(spec, device_under_test())
    dev.load_state_dict(cpu.state_dict())  # weights, SR generator state and RHT signs
    assert dev.weight.device.type == device_under_test().type

    out_cpu, calls_cpu = _run_linear(cpu, x, dy, position)
    out_dev, calls_dev = _run_linear(dev, x, dy, position)
    quantized = Recipe.from_dict(spec).quantized
    assert len(calls_dev) == len(calls_cpu) == (3 if quantized else 0)
    for gemm, c_dev, c_cpu in zip(("fprop", "dgrad", "wgrad"), calls_dev, calls_cpu):
        assert c_dev["keys"] == c_cpu["keys"], f"{recipe} {gemm}: SR keys differ"
        assert_bits_equal(c_dev["a"], c_cpu["a"], f"{recipe} {gemm}: quantized A")
        assert_bits_equal(c_dev["b"], c_cpu["b"], f"{recipe} {gemm}: quantized B")
    w, b = weights
    _check_outputs_against_operands(out_dev, calls_dev, x, dy, w, b, f"{recipe} on {device_under_test()}")
    _check_outputs_against_operands(out_cpu, calls_cpu, x, dy, w, b, f"{recipe} on cpu")
    assert torch.equal(cpu.gemms.generator.get_state(), dev.gemms.generator.get_state())


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantized_linear_presets_on_general_inputs(recipe):
    """The presets exactly as shipped (MXFP4 with its size-32 RHT), Gaussian inputs: outputs on
    the device within the fp32 bound of its own operands; operands equal to the CPU's up to
    the RHT's rounding (a few ulps of the scale, and rare elements that sit on a rounding
    boundary and round the other way)."""
    spec = {"name": recipe}
    g = torch.Generator().manual_seed(20)
    weights = (torch.randn(OUT, IN, generator=g) * 0.1, torch.randn(OUT, generator=g) * 0.1)
    x, dy = torch.randn(BATCH, SEQ, IN, generator=g), torch.randn(BATCH, SEQ, OUT, generator=g) * 1e-3
    cpu = _make_linear(spec, "cpu", weights=weights)
    dev = _make_linear(spec, device_under_test())
    dev.load_state_dict(cpu.state_dict())
    out_cpu, calls_cpu = _run_linear(cpu, x, dy, (3, 0))
    out_dev, calls_dev = _run_linear(dev, x, dy, (3, 0))
    w, b = weights
    _check_outputs_against_operands(out_dev, calls_dev, x, dy, w, b, f"{recipe} on {device_under_test()}")
    _check_outputs_against_operands(out_cpu, calls_cpu, x, dy, w, b, f"{recipe} on cpu")
    for gemm, c_dev, c_cpu in zip(("fprop", "dgrad", "wgrad"), calls_dev, calls_cpu):
        for side in ("a", "b"):
            got, want = c_dev[side].double(), c_cpu[side].double()
            diff = (got - want).abs()
            ulps = diff <= 2.0 ** -14 * torch.maximum(got.abs(), want.abs())  # see the rotation bound above
            assert float((~ulps).double().mean()) <= 0.01, f"{recipe} {gemm} {side}: {int((~ulps).sum())} flips"
            assert float(diff.max()) <= 0.5 * float(want.abs().max()), f"{recipe} {gemm} {side}"


def _grouped_reference(call: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 per-group products of a recorded grouped GEMM and their fp32 bound (layouts as
    ``linear.backends.grouped_mm``: B (G, N, K) with A's rows in groups, or A and B in K groups)."""
    a, b, sizes = call["a"], call["b"], call["sizes"]
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    if b.dim() == 3:
        refs = [a[s:s + n].double() @ b[g].double().T for g, (s, n) in enumerate(zip(starts, sizes))]
        bounds = [gemm_error_bound(a[s:s + n], b[g]) for g, (s, n) in enumerate(zip(starts, sizes))]
        return torch.cat(refs), torch.cat(bounds)
    refs = [a[:, s:s + n].double() @ b[:, s:s + n].double().T for s, n in zip(starts, sizes)]
    bounds = [gemm_error_bound(a[:, s:s + n], b[:, s:s + n]) for s, n in zip(starts, sizes)]
    return torch.stack(refs), torch.stack(bounds)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if Recipe.preset(r).quantized])
def test_grouped_expert_linears_match_cpu(recipe):
    """MoE experts as grouped GEMMs (``grouped_linear``: torch._grouped_mm where it runs), one
    expert without tokens: quantized operands and SR keys bitwise the CPU's, outputs within the
    fp32 bound of float64 per-expert products of the operands, on both devices."""
    from megatron_ufp4.linear.grouped import grouped_linear

    spec, sizes = _exact_rht_recipe(recipe), (16, 0, 32)
    weights = [dyadic((OUT, IN), 70 + e, 7) for e in range(len(sizes))]
    x, dy = dyadic((sum(sizes), IN), 80, 6), dyadic((sum(sizes), OUT), 81, 8)

    def run(device):
        lins = [QuantizedLinear(IN, OUT, bias=False, recipe=spec, sr_seed=200 + e, backend=REC, device=device)
                for e in range(len(sizes))]
        with torch.no_grad():
            for lin, w in zip(lins, weights):
                lin.weight.copy_(w)
        rec = recorder()
        lins[0].step_context.at(4, 1)
        xg = x.detach().to(device, copy=True).requires_grad_(True)
        y = grouped_linear(lins, xg, sizes)
        y.backward(dy.to(device))
        out = {"y": y.detach().cpu(), "dx": xg.grad.cpu(), "dw": [None if lin.weight.grad is None else
                                                                 lin.weight.grad.cpu() for lin in lins]}
        return out, rec.take()

    out_cpu, calls_cpu = run("cpu")
    out_dev, calls_dev = run(device_under_test())
    assert len(calls_cpu) == len(calls_dev) == 3
    for gemm, c_dev, c_cpu in zip(("fprop", "dgrad", "wgrad"), calls_dev, calls_cpu):
        assert c_dev["keys"] == c_cpu["keys"] and c_dev["sizes"] == c_cpu["sizes"], f"{recipe} {gemm}"
        assert_bits_equal(c_dev["a"], c_cpu["a"], f"{recipe} grouped {gemm}: quantized A")
        assert_bits_equal(c_dev["b"], c_cpu["b"], f"{recipe} grouped {gemm}: quantized B")
    for where, out, calls in ((device_under_test(), out_dev, calls_dev), ("cpu", out_cpu, calls_cpu)):
        (y_ref, y_bound), (dx_ref, dx_bound), (dw_ref, dw_bound) = (_grouped_reference(c) for c in calls)
        assert_within_bound(out["y"], y_ref, y_bound, f"{recipe} grouped fprop on {where}")
        assert_within_bound(out["dx"], dx_ref, dx_bound, f"{recipe} grouped dgrad on {where}")
        assert out["dw"][1] is None  # the expert without tokens
        for e in (0, 2):
            assert_within_bound(out["dw"][e], dw_ref[e], dw_bound[e], f"{recipe} grouped wgrad expert {e} on {where}")


# -- 3. SR state in checkpoints: device-independent ---------------------------------------------
def _save_load(module, device) -> dict:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, map_location=device, weights_only=True)


@pytest.mark.parametrize("direction", ["device_to_cpu", "cpu_to_device"])
@pytest.mark.parametrize("recipe", ["ufp4", "nvfp4", "mxfp4"])
def test_sr_state_checkpoint_round_trip_across_devices(recipe, direction):
    """A QuantizedLinear's state dict (weights, SR generator, RHT signs) saved on one device loads
    into a fresh module on the other (and into a fresh one on the same device), and all three
    continue with identical SR keys and bitwise equal quantized operands."""
    spec = _exact_rht_recipe(recipe)
    src_dev, dst_dev = (device_under_test(), torch.device("cpu")) if direction == "device_to_cpu" else \
        (torch.device("cpu"), device_under_test())
    weights = (dyadic((OUT, IN), 30, 7), dyadic((OUT,), 31, 7))
    src = _make_linear(spec, src_dev, sr_seed=3, weights=weights)
    for i in range(2):  # advance the generator (keys drawn outside training)
        _run_linear(src, dyadic((BATCH, SEQ, IN), 40 + i, 6), dyadic((BATCH, SEQ, OUT), 50 + i, 8), None)
    state = src.state_dict()
    extra = state["_extra_state"]
    assert extra["sr_generator"].device.type == "cpu" and extra["sr_generator"].dtype == torch.uint8

    other = _make_linear(spec, dst_dev, sr_seed=1000)  # other seed: only the load makes the states agree
    other.load_state_dict(_save_load(src, dst_dev))
    same = _make_linear(spec, src_dev, sr_seed=1000)
    same.load_state_dict(_save_load(src, src_dev))
    assert other.weight.device.type == dst_dev.type
    for m in (other, same):
        assert torch.equal(m.gemms.generator.get_state(), src.gemms.generator.get_state())
        assert torch.equal(m.gemms.rht.signs, src.gemms.rht.signs)

    x, dy = dyadic((BATCH, SEQ, IN), 60, 6), dyadic((BATCH, SEQ, OUT), 61, 8)
    runs = {name: _run_linear(m, x, dy, None) for name, m in (("src", src), ("same", same), ("other", other))}
    assert len(runs["src"][1]) == 3
    for name in ("same", "other"):
        for gemm, c, c_src in zip(("fprop", "dgrad", "wgrad"), runs[name][1], runs["src"][1]):
            assert c["keys"] == c_src["keys"], f"{name} {gemm}: SR keys differ after the round trip"
            assert any(k is not None for k in c["keys"]) or gemm == "fprop"
            assert_bits_equal(c["a"], c_src["a"], f"{name} ({direction}) {gemm}: quantized A")
            assert_bits_equal(c["b"], c_src["b"], f"{name} ({direction}) {gemm}: quantized B")
    assert_bits_equal(runs["same"][0]["y"], runs["src"][0]["y"], "same-device continuation y")
    for m in (other, same):
        assert torch.equal(m.gemms.generator.get_state(), src.gemms.generator.get_state())


