"""CUDA: the quantizer gives the CPU's bits on the device (every format, RTNE and SR, RHT,
grouped operands, the fused path).  Shared setup and what "equal" means: cuda_common.py."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from cuda_common import (CUDA_MARKS, DRY_RUN, assert_bits_equal, device_under_test, dyadic,
                         sample_input)
from cuda_common import ieee_fp32_matmul, recording_backend  # noqa: F401 (autouse fixtures)
from megatron_ufp4.fp4 import RHT, fake_quantize, quantize
from megatron_ufp4.fp4.grouped import Segments, fake_quantize_grouped
from megatron_ufp4.fp4.sr_random import SRIndex

pytestmark = CUDA_MARKS


# -- 1. the quantizer: same bits on the device as on the CPU --------------------------------------
# (format, options, shape): every entry of fp4/formats.py plus its option variants
FORMAT_CASES = [
    ("e2m1", {}, (64, 128)),
    ("int4", {}, (64, 128)),
    ("nvfp4", {}, (64, 128)),
    ("mxfp4", {}, (64, 128)),
    ("mxfp4", {"scale_mode": "rceil"}, (64, 128)),
    ("e2m1", {"max_level": 4}, (64, 128)),
    ("int4", {"block": 32}, (64, 128)),
    ("nvfp4", {"block_2d": True}, (64, 128)),
]
FORMAT_IDS = [f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for f, o, _ in FORMAT_CASES]


def _quantize_both(x, fmt, opts, rounding, axis=-1, rht=None, sr_index=None, key=None, fused=False):
    dev = device_under_test()
    common = dict(axis=axis, rounding=rounding, rht=rht, sr_index=sr_index, sr_key=key, **opts)
    q_cpu = quantize(x, fmt, **common)
    q_dev = quantize(x.to(dev), fmt, **common)
    f_cpu = fake_quantize(x, fmt, **common)
    f_dev = fake_quantize(x.to(dev), fmt, fused=fused, **common)
    return q_cpu, q_dev, f_cpu, f_dev


def _assert_quantized_equal(q_cpu, q_dev, f_cpu, f_dev, what):
    assert q_dev.codes.device.type == device_under_test().type
    assert_bits_equal(q_dev.codes, q_cpu.codes, f"{what}: codes")
    assert_bits_equal(q_dev.scales, q_cpu.scales, f"{what}: stored scales")
    assert_bits_equal(q_dev.decode_scales, q_cpu.decode_scales, f"{what}: decode scales")
    assert_bits_equal(q_dev.tensor_scale, q_cpu.tensor_scale, f"{what}: tensor scale")
    assert_bits_equal(q_dev.packed(), q_cpu.packed(), f"{what}: packed bytes")
    assert_bits_equal(q_dev.dequantize(rotated=True), q_cpu.dequantize(rotated=True), f"{what}: dequantized")
    assert_bits_equal(f_dev, f_cpu, f"{what}: fake_quantize")


@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("fmt,opts,shape", FORMAT_CASES, ids=FORMAT_IDS)
def test_quantizer_bits_match_cpu(fmt, opts, shape, rounding):
    x = sample_input(shape)
    key = 123456789 if rounding == "sr" else None
    _assert_quantized_equal(*_quantize_both(x, fmt, opts, rounding, key=key), f"{fmt} {opts} {rounding}")


@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_quantizer_sr_generator_axis0_and_shard_index_match_cpu(fmt):
    """SR keys drawn from a (CPU) generator seeded alike; axis 0; a shard offset whose global
    indices pass 2^31 (the second hash round)."""
    x = sample_input((128, 64), seed=1)
    dev = device_under_test()
    for seed in (0, 7):
        g_cpu, g_dev = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        q_cpu = quantize(x, fmt, rounding="sr", generator=g_cpu)
        q_dev = quantize(x.to(dev), fmt, rounding="sr", generator=g_dev)
        assert_bits_equal(q_dev.codes, q_cpu.codes, f"{fmt} sr generator seed {seed}: codes")
        assert torch.equal(g_cpu.get_state(), g_dev.get_state())
    q = _quantize_both(x, fmt, {}, "sr", axis=0, key=99)
    _assert_quantized_equal(*q, f"{fmt} sr axis 0")
    wide = SRIndex(row_offset=2 ** 24, col_offset=32, row_stride=4096)  # last index > 2^31
    q = _quantize_both(x, fmt, {}, "sr", sr_index=wide, key=5)
    _assert_quantized_equal(*q, f"{fmt} sr wide shard index")


@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_quantizer_with_rht16_on_exact_inputs_matches_cpu(fmt, rounding):
    x = dyadic((64, 128), seed=2, exp=6)
    x[0, :32] = 0.0
    rht = RHT(16, seed=3)
    key = 4242 if rounding == "sr" else None
    _assert_quantized_equal(*_quantize_both(x, fmt, {}, rounding, rht=rht, key=key), f"{fmt} RHT16 {rounding}")
    dev = device_under_test()
    assert_bits_equal(rht.rotate(x.to(dev)), rht.rotate(x), "RHT16 rotation of dyadic inputs")
    # exact on dyadic inputs up to the sign of zero (the butterfly's a - a is +0, then a sign flip)
    assert torch.equal(rht.unrotate(rht.rotate(x.to(dev))).cpu(), x), "RHT16 round trip of dyadic inputs"


@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("axis", [0, 1], ids=["groups-of-rows", "groups-along-K"])
@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_grouped_quantizer_matches_cpu(fmt, axis, rounding):
    """The grouped quantizer (MoE experts: G operands in one call, an empty group included) gives
    the CPU's bits on the device, without RHT on general inputs and with a size-16 RHT on exact ones."""
    sizes = (32, 0, 64, 32)
    shape = (sum(sizes), 64) if axis == 0 else (32, sum(sizes))
    seg = Segments(axis, sizes)
    keys = (11, None, 22, 33) if rounding == "sr" else None
    dev = device_under_test()
    for x, rht in ((sample_input(shape, seed=8), None), (dyadic(shape, seed=9, exp=6), RHT(16, seed=1))):
        want = fake_quantize_grouped(x, fmt, seg, rounding, rht, keys=keys)
        got = fake_quantize_grouped(x.to(dev), fmt, seg, rounding, rht, keys=keys)
        assert_bits_equal(got, want, f"grouped {fmt} axis {axis} {rounding} rht {rht}")


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_rht_rotation_bitwise_on_device(size):
    """Any RHT size, general inputs: the butterfly gives the CPU's bits on the device."""
    x = sample_input((64, 256), seed=4)
    rht = RHT(size, seed=5)
    assert_bits_equal(rht.rotate(x.to(device_under_test())), rht.rotate(x), f"RHT{size} rotate")
    assert_bits_equal(rht.unrotate(x.to(device_under_test())), rht.unrotate(x), f"RHT{size} unrotate")


@pytest.mark.skipif(DRY_RUN, reason="fused on the CPU compiles C++ (minutes); the CPU suite covers it")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the fused backend on CUDA needs triton")
@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("fmt", ["e2m1", "int4", "nvfp4", "mxfp4"])
def test_fused_quantizer_on_device_matches_eager_cpu(fmt, rounding):
    """gemm.backend=fused: torch.compile'd (Triton) quantizer, same bits as the eager CPU one."""
    x = sample_input((64, 128), seed=6)
    key = 777 if rounding == "sr" else None
    _, _, f_cpu, f_dev = _quantize_both(x, fmt, {}, rounding, key=key, fused=True)
    assert_bits_equal(f_dev, f_cpu, f"fused {fmt} {rounding}")


