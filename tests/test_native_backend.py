"""gemm.backend=native: what a CPU can check (format support, the cuBLAS scale layout, one-line
refusals), and on a GPU with FP4 tensor cores (compute capability 10.x) the GEMM itself."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_ufp4.fp4.formats import make_format
from megatron_ufp4.fp4.recipes import PRESETS, Recipe

pytestmark = [pytest.mark.numerical,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]


def _native_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 10


def test_which_formats_have_a_native_gemm():
    from megatron_ufp4.linear.native_backend import native_format_problem

    assert native_format_problem(make_format("nvfp4")) is None
    assert native_format_problem(make_format("nvfp4", block_2d=True)) is None
    assert native_format_problem(make_format("mxfp4")) is None
    assert "not plain E2M1" in native_format_problem(make_format("int4"))  # UFP4's uniform grid
    assert "not plain E2M1" in native_format_problem(make_format("e2m1", max_level=4))
    assert "no hardware block scale" in native_format_problem(make_format("e2m1"))  # fp32 scales
    native = {n for n in PRESETS if n != "bf16"
              if all(native_format_problem(op.fmt) is None for g in ("fprop", "dgrad", "wgrad")
                     for op in (Recipe.from_dict({"name": n}).gemm(g).a, Recipe.from_dict({"name": n}).gemm(g).b))}
    assert native == {"nvfp4", "mxfp4"}


@pytest.mark.parametrize("rows,cols", [(128, 4), (256, 8), (100, 6), (3, 1)])
def test_scale_swizzle_is_the_cublas_tile_layout(rows, cols):
    """Element (r, c) of a 128 x 4 tile sits at (r % 32) * 16 + (r // 32) * 4 + c inside its tile;
    tiles follow in row-major order; padding is zero."""
    from megatron_ufp4.linear.native_backend import swizzle_scales

    s = torch.randint(1, 255, (rows, cols), dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = swizzle_scales(s).view(torch.uint8)
    tr, tc = -(-rows // 128), -(-cols // 4)
    want = torch.zeros(tr * tc * 512, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * tc + c // 4
            rr, cc = r % 128, c % 4
            want[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc] = s.view(torch.uint8)[r, c]
    assert torch.equal(out, want)


@pytest.mark.skipif(_native_gpu(), reason="checks the refusal on machines without FP4 tensor cores")
def test_native_is_refused_in_one_line_without_fp4_tensor_cores():
    from megatron_ufp4.linear.backends import get_backend

    backend = get_backend("native")
    with pytest.raises(ValueError, match="needs a CUDA GPU with FP4 tensor cores"):
        backend.check_device(torch.device("cpu"))


def test_formats_without_native_gemm_are_refused_in_one_line():
    from megatron_ufp4.fp4.recipes import OperandQuant
    from megatron_ufp4.linear.backends import Operand, get_backend

    op = Operand(torch.randn(16, 64), OperandQuant(make_format("int4")), None)
    with pytest.raises(ValueError, match="native: format int4 .* use gemm.backend=triton"):
        get_backend("native").quantize(op)


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _decode(codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, block: int) -> torch.Tensor:
    """Packed E2M1 codes (element 2i in the low nibble, sign bit 8) x block scale x tensor scale,
    as the reference dequantizes: level * (scale * tensor scale) in fp32."""
    c = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1).long()
    level = _E2M1[c & 7] * torch.where(c >= 8, -1.0, 1.0)
    return level * (scales.float() * tensor_scale.float()).repeat_interleave(block, dim=1)


@pytest.mark.parametrize("k", [48, 64])
def test_operands_are_padded_to_32_along_k_and_decode_unchanged(k):
    """The FP4 _scaled_mm needs K % 32 == 0; an NVFP4 operand (16-element blocks) may have
    K = 16 mod 32 (a Wgrad over such a token count): padded with zero codes and zero scales,
    it decodes to the emulated operand followed by zeros (run in the Triton interpreter)."""
    from megatron_ufp4.fp4.hadamard import RHT
    from megatron_ufp4.fp4.quantize import tensor_amax
    from megatron_ufp4.fp4.recipes import OperandQuant
    from megatron_ufp4.linear.backends import Operand, get_backend

    f = make_format("nvfp4")
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(1))
    rht = RHT(16, 1)
    op = Operand(x, OperandQuant(f, "sr"), rht, 12345, None, tensor_amax(x, f, rht))
    q = get_backend("native").quantize(op)
    padded = -(-k // 32) * 32
    assert q.codes.shape == (40, padded // 2) and q.scales.shape == (40, padded // 16)
    values = _decode(q.codes, q.scales, q.tensor_scale, 16)
    want = get_backend("emulated").quantize(op)
    assert torch.equal(values[:, :k].view(torch.int32), want.view(torch.int32))
    assert not bool(values[:, k:].any())


@pytest.mark.skipif(not _native_gpu(), reason="needs a GPU with FP4 tensor cores (compute capability 10.x)")
@pytest.mark.parametrize("k", [512, 48])  # 48: K = 16 mod 32, padded for the tensor cores
@pytest.mark.parametrize("fmt,opts", [("nvfp4", {}), ("nvfp4", {"block_2d": True}), ("mxfp4", {})], ids=str)
def test_native_gemm_matches_emulated_within_fp32_accumulation(fmt, opts, k):
    """Same exact products (E2M1 x scale), summed in another order: within 2 gamma_(K+2) |A| |B|^T
    of the emulated GEMM, u = 2^-24 (each side accumulates K terms and rounds its decode scales)."""
    from megatron_ufp4.fp4.hadamard import RHT
    from megatron_ufp4.fp4.quantize import tensor_amax
    from megatron_ufp4.fp4.recipes import OperandQuant
    from megatron_ufp4.linear.backends import Operand, get_backend

    f = make_format(fmt, **opts)
    if k % f.block:
        pytest.skip(f"K={k} is not a multiple of {fmt}'s {f.block}-element block")
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(256, k, generator=g).cuda() for _ in range(2))
    rht = RHT(16, 1)
    ops = [Operand(t, OperandQuant(f, "rtne"), rht, None, None, tensor_amax(t, f, rht)) for t in (a, b)]
    em, nat = get_backend("emulated"), get_backend("native")
    qa, qb = em.quantize(ops[0]), em.quantize(ops[1])
    want = (qa.double() @ qb.double().T)
    got = nat.gemm(*ops).double()
    k = a.shape[1] + 2
    gamma = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    bound = 2 * gamma * (qa.double().abs() @ qb.double().abs().T)
    assert bool(((got - want).abs() <= bound).all())
