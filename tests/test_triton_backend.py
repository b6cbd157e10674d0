"""gemm.backend=triton: the Triton kernels give the emulated backend's bits.

On a CPU the kernels run in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before
anything imports them); on a GPU machine the same tests run the compiled kernels on CUDA
tensors when MEGATRON_UFP4_TEST_DEVICE=cuda.  Shapes are small and tiles large: every program
instance costs milliseconds in the interpreter.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from megatron_ufp4.fp4.formats import make_format
from megatron_ufp4.fp4.grouped import GroupedIndex, Segments
from megatron_ufp4.fp4.hadamard import RHT
from megatron_ufp4.fp4.quantize import tensor_amax
from megatron_ufp4.fp4.recipes import PRESETS, OperandQuant
from megatron_ufp4.fp4.sr_random import SRIndex, needs_wide_index, uniform_from_index
from megatron_ufp4.linear import QuantizedLinear
from megatron_ufp4.linear.backends import GroupedOperand, Operand, get_backend

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from megatron_ufp4.linear import triton_kernels  # noqa: E402  (after the interpreter choice in conftest.py)

DEVICE = os.environ.get("MEGATRON_UFP4_TEST_DEVICE", "cpu") if torch.cuda.is_available() else "cpu"
# the interpreter runs kernels as numpy, which warns where a GPU silently computes inf / NaN
# (1/0 in a masked-out lane, NaN blocks): the results are checked bit for bit instead
pytestmark = [pytest.mark.numerical, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytestmark.append(pytest.mark.skip(reason="CPU tensors need TRITON_INTERPRET=1 (set in conftest.py)"))

# (format, options) pairs: every scale kind, 2-D weight blocks, range-restricted e2m1, both E8M0 rules
FORMATS = [("int4", {}), ("e2m1", {}), ("e2m1", {"max_level": 4}), ("nvfp4", {}), ("nvfp4", {"block_2d": True}),
           ("mxfp4", {}), ("mxfp4", {"scale_mode": "rceil"}), ("int4", {"block_2d": True}), ("nvint4", {})]
FORMAT_IDS = [f + "".join(f"-{k}={v}" for k, v in o.items()) for f, o in FORMATS]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Equal bit for bit, except that any NaN matches any NaN (the sign of a NaN is not specified)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    gn, wn = torch.isnan(got).cpu(), torch.isnan(want).cpu()
    assert torch.equal(gn, wn), f"{what}: NaN positions differ"
    diff = (bits(got) != bits(want)) & ~wn
    if diff.any():
        i = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} differ; first at {i}: "
                             f"triton {got.cpu()[i].item()!r} vs emulated {want.cpu()[i].item()!r}")


def sample(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Random values over 8 decades, an all-zero block, -0.0 and a signed zero block: every scale path."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-4, 4, shape[-1])[torch.randperm(shape[-1], generator=g)]
    x[0, :32] = 0.0
    x[1, :32] = -0.0
    x[2, 5] = -0.0
    return x.to(dtype).to(DEVICE)


def operand(x, fmt, opts, rounding, rht, index=None, key=987654):
    f = make_format(fmt, **opts)
    amax = tensor_amax(x, f, rht) if f.scale == "e4m3" else None
    return Operand(x, OperandQuant(f, rounding), rht, key if rounding == "sr" else None, index, amax)


@pytest.fixture(scope="module")
def backends():
    return get_backend("emulated"), get_backend("triton"), get_backend("triton_bf16")


# -- the SR hash ----------------------------------------------------------------------------------
@triton.jit
def _draw(idx_ptr, out_ptr, key, n, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    idx = tl.load(idx_ptr + offs, mask=offs < n, other=0)
    if WIDE:
        u = triton_kernels.sr_uniform(idx, key.to(tl.int64), WIDE)
    else:
        u = triton_kernels.sr_uniform(idx, key, WIDE)
    tl.store(out_ptr + offs, u, mask=offs < n)


def _draws(idx: torch.Tensor, key: int, wide: bool) -> torch.Tensor:
    n = idx.numel()
    out = torch.empty(n, dtype=torch.float32, device=idx.device)
    block = -(-n // 4) if DEVICE == "cpu" else 1024  # the interpreter: few programs; a GPU: a register tile
    _draw[(-(-n // block),)](idx, out, key, n, BLOCK=triton.next_power_of_2(block), WIDE=wide)
    return out


def test_sr_hash_in_triton_equals_the_torch_one_on_a_million_indices():
    g = torch.Generator().manual_seed(3)
    n = 1 << 20
    # small, near 2^31 (both sides of the wide branch) and up to 2^44
    idx = torch.cat([torch.arange(n // 4), torch.randint(2 ** 31 - n // 8, 2 ** 31 + n // 8, (n // 4,), generator=g),
                     torch.randint(0, 2 ** 44, (n // 2,), generator=g)]).to(DEVICE)
    key = 0x5EED1234
    want = uniform_from_index(idx, torch.tensor(key, device=DEVICE))
    assert_same_bits(_draws(idx, key, wide=True), want, "uniform draws, int64")
    # below 2^31 the kernels hash in int32 (wrapping products): the same draws
    narrow = idx < 2 ** 31
    assert_same_bits(_draws(idx[narrow].to(torch.int32), key, wide=False), want[narrow], "uniform draws, int32")


# -- one operand ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("fmt,opts", FORMATS, ids=FORMAT_IDS)
def test_quantize_equals_emulated_bit_for_bit(backends, fmt, opts, rounding):
    """Every RHT size (and none); 48 rows (not a multiple of the row tile); a bf16 and an fp32 input."""
    em, tr, _ = backends
    for rht, dtype in ((None, torch.float32), (RHT(16, 1), torch.bfloat16), (RHT(32, 2), torch.float32),
                       (RHT(64, 3), torch.float32), (RHT(128, 4), torch.bfloat16)):
        op = operand(sample((48, 256), seed=1, dtype=dtype), fmt, opts, rounding, rht)
        assert_same_bits(tr.quantize(op), em.quantize(op), f"{fmt} {opts} {rounding} {rht} {dtype}")


@pytest.mark.parametrize("fmt,opts", [("int4", {}), ("nvfp4", {}), ("mxfp4", {})], ids=str)
def test_transposed_view_shard_offsets_and_indices_past_2_31(backends, fmt, opts):
    """A non-contiguous operand (Wgrad's dY^T is a view) at a shard offset whose SR indices cross
    2^31 (the kernel reads strides and draws the wide-index hash in int64), and one whose last
    index is 2^31 - 2 (hashed in int32)."""
    em, tr, _ = backends
    src = sample((256, 64), seed=2)
    xt = src.t()  # (64, 256), strides (1, 64)
    wide = SRIndex(row_offset=(2 ** 31) // 512 - 20, col_offset=128, row_stride=512)
    top = SRIndex(row_offset=(2 ** 31) // 512 - 64, col_offset=255, row_stride=512)  # last index 2^31 - 2: int32
    assert needs_wide_index(xt.shape, wide) and not needs_wide_index(xt.shape, top)
    for index in (wide, top):
        for rht in (None, RHT(16, 5)):
            op = operand(xt, fmt, opts, "sr", rht, index=index)
            assert_same_bits(tr.quantize(op), em.quantize(op), f"{fmt} transposed, offset {index}")


@pytest.mark.parametrize("fmt,opts", [("int4", {}), ("nvfp4", {}), ("nvfp4", {"block_2d": True}), ("mxfp4", {})],
                         ids=str)
def test_nonfinite_blocks_decode_to_nan_and_leave_others_alone(backends, fmt, opts):
    em, tr, _ = backends
    x = sample((32, 128), seed=3)
    x[3, 40], x[9, 70], x[20, 1] = float("nan"), float("inf"), -float("inf")
    for rht in (None, RHT(16, 6)):
        op = operand(x, fmt, opts, "rtne", rht)
        got, want = tr.quantize(op), em.quantize(op)
        assert_same_bits(got, want, f"{fmt} with NaN/Inf")
        assert bool(torch.isnan(got[3, 32:48]).all()) and not bool(torch.isnan(got[28, 32:]).any())


@pytest.mark.parametrize("fmt,opts", FORMATS[:6], ids=FORMAT_IDS[:6])
def test_bf16_operands_are_the_exact_values_rounded_once(backends, fmt, opts):
    em, _, fast = backends
    op = operand(sample((32, 128), seed=4), fmt, opts, "sr", RHT(16, 7))
    assert_same_bits(fast.quantize(op), em.quantize(op).to(torch.bfloat16), f"{fmt} bf16 operand")


def test_mxfp4_values_fit_bf16_exactly(backends):
    """An E2M1 value times a power of two has at most 2 significant bits: bf16 holds it exactly."""
    em, _, fast = backends
    op = operand(sample((32, 128), seed=5), "mxfp4", {}, "rtne", RHT(32, 1))
    want = em.quantize(op)
    assert torch.equal(fast.quantize(op).float(), want)


# -- grouped operands (MoE experts) ---------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("fmt,opts", [("int4", {}), ("nvfp4", {}), ("nvfp4", {"block_2d": True}), ("mxfp4", {})],
                         ids=str)
def test_grouped_quantize_equals_emulated(backends, fmt, opts, axis):
    em, tr, _ = backends
    f = make_format(fmt, **opts)
    sizes = (32, 0, 64, 32)
    x = sample((sum(sizes), 64) if axis == 0 else (32, sum(sizes)), seed=6)
    seg = Segments(axis, sizes)
    for rounding, rht in (("rtne", None), ("sr", RHT(16, 2)), ("sr", RHT(32, 3))):
        keys = (11, None, 22, 33) if rounding == "sr" else None
        index = None
        if axis == 0 and rounding == "sr":  # shard-like factored indices with a per-group row base
            rows = torch.cat([torch.arange(s) + 1000 * g for g, s in enumerate(sizes)]).to(DEVICE)
            index = GroupedIndex(rows, 96, torch.arange(64, device=DEVICE) + 16, False)
        op = GroupedOperand(x, OperandQuant(f, rounding), seg, rht, keys, index, None)
        assert_same_bits(tr.quantize_grouped(op), em.quantize_grouped(op), f"grouped {fmt} axis {axis} {rounding}")


@pytest.mark.parametrize("axis", [0, 1])
def test_bf16_grouped_gemm_within_its_rounding_bound(backends, axis):
    """triton_bf16's expert GEMM (torch's bf16 grouped kernel: bf16 out) against the exact per-group
    GEMM in float64: operands rounded to bf16 (2 u_b + u_b^2 per product), fp32 accumulation of K
    terms (gamma_K), then the output rounded to bf16 (u_b of a value <= (1 + 2 u_b + u_b^2 +
    gamma_K) |A| |B|^T); u_b = 2^-9."""
    em, _, fast = backends
    sizes = (32, 0, 48, 16)
    f = make_format("int4")
    if axis == 0:  # Fprop-like: token rows grouped, one (N, K) weight per group
        a = GroupedOperand(sample((sum(sizes), 64), seed=15), OperandQuant(f, "rtne"), Segments(0, sizes), RHT(16, 1))
        qa, qb = em.quantize_grouped(a), em.quantize(operand(sample((3 * 24, 64), seed=16), "int4", {}, "rtne",
                                                               RHT(16, 1)))
        qb = qb.reshape(3, 24, 64)
        qb = torch.cat([qb[:1], qb[:1], qb[1:]])  # 4 groups (one empty)
        ga, gb = fast.quantize_grouped(a), qb.to(torch.bfloat16)
        exact = torch.cat([qa[s:s + n].double() @ qb[g].double().T
                           for g, (s, n) in enumerate(zip((0, 32, 32, 80), sizes))])
        mag = torch.cat([qa[s:s + n].double().abs() @ qb[g].double().abs().T
                         for g, (s, n) in enumerate(zip((0, 32, 32, 80), sizes))])
        k = 64
    else:  # Wgrad-like: both operands grouped along K (tokens), one (M, N) result per group
        seg = Segments(1, sizes)
        a = GroupedOperand(sample((24, sum(sizes)), seed=17), OperandQuant(f, "sr"), seg, RHT(16, 1), (1, None, 2, 3))
        b = GroupedOperand(sample((40, sum(sizes)), seed=18), OperandQuant(f, "rtne"), seg, RHT(16, 1))
        qa, qb = em.quantize_grouped(a).double(), em.quantize_grouped(b).double()
        ga, gb = fast.quantize_grouped(a), fast.quantize_grouped(b)
        cuts = list(zip((0, 32, 32, 80), sizes))
        exact = torch.stack([qa[:, s:s + n] @ qb[:, s:s + n].T for s, n in cuts])
        mag = torch.stack([qa[:, s:s + n].abs() @ qb[:, s:s + n].abs().T for s, n in cuts])
        k = max(sizes)
    got = fast.grouped_matmul(ga, gb, sizes).double()
    assert got.dtype == torch.float64 and got.shape == exact.shape
    ub = 2.0 ** -9
    gamma = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    rel = 2 * ub + ub * ub + gamma
    bound = (rel * (1 + ub) + ub) * mag.to(got.device)
    assert bool(((got - exact.to(got.device)).abs() <= bound).all())
    assert not torch.equal(got, exact.to(got.device))  # the bf16 roundings are really there


def test_grouped_kernel_is_used_only_where_torch_has_one():
    from megatron_ufp4.linear.backends import grouped_kernel_takes

    # CUDA: bf16 only (torch 2.13's fp32 "grouped" GEMM is a host-synchronizing per-group fallback)
    assert grouped_kernel_takes("cuda", torch.bfloat16, torch.bfloat16)
    assert not grouped_kernel_takes("cuda", torch.float32, torch.float32)
    assert grouped_kernel_takes("cpu", torch.float32, torch.float32)
    assert not grouped_kernel_takes("cpu", torch.float64, torch.float64)


# -- QuantizedLinear --------------------------------------------------------------------------------
def _linear_run(backend, recipe, x, dy, training_position):
    torch.manual_seed(0)
    lin = QuantizedLinear(64, 96, True, recipe, sr_seed=9, backend=backend).to(DEVICE)
    if training_position:
        lin.step_context.at(3, 1)
    with torch.no_grad():
        lin.weight[7] *= 30  # an outlier row: block scales that differ a lot
    xg = x.clone().requires_grad_()
    y = lin(xg)
    y.backward(dy)
    return y, xg.grad, lin.weight.grad, lin.bias.grad


@pytest.mark.parametrize("tokens", [18, 256])
@pytest.mark.parametrize("recipe", [r for r in PRESETS if r != "bf16"])
def test_quantized_linear_forward_and_backward_equal_emulated(recipe, tokens, monkeypatch):
    """All three GEMMs on a 3-D input: 2 x 9 = 18 tokens (Wgrad pads K to the block / RHT tile, so
    dY is quantized twice) and 2 x 128 tokens (dY's two forms come from one read)."""
    from megatron_ufp4.linear import triton_backend

    pair_calls = []
    real_pair = triton_backend.quantize_pair
    monkeypatch.setattr(triton_backend, "quantize_pair", lambda *a, **k: pair_calls.append(1) or real_pair(*a, **k))
    x = sample((tokens, 64), seed=7).reshape(2, tokens // 2, 64)
    dy = sample((tokens, 96), seed=8).reshape(2, tokens // 2, 96)
    for position in (False, True):
        want = _linear_run("emulated", recipe, x, dy, position)
        got = _linear_run("triton", recipe, x, dy, position)
        for name, g, w in zip(("y", "dx", "dw", "db"), got, want):
            assert_same_bits(g, w, f"{recipe} {name}")
    assert len(pair_calls) == (2 if tokens == 256 else 0)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "e2m1"])
def test_bf16_operand_gemm_within_its_rounding_bound(backends, fmt):
    """triton_bf16's GEMM against the exact one in float64: each operand element is rounded once to
    bf16 (relative error <= u_b = 2^-9), so a product is off by <= 2 u_b + u_b^2 relative, and the
    fp32 accumulation of K terms adds gamma_K; bound: (2 u_b + u_b^2 + gamma_K) |A| |B|^T."""
    em, _, fast = backends
    a = operand(sample((32, 128), seed=9), fmt, {}, "sr", RHT(16, 1))
    b = operand(sample((48, 128), seed=10), fmt, {}, "rtne", RHT(16, 1))
    qa, qb = em.quantize(a).double(), em.quantize(b).double()
    exact = qa @ qb.T
    got = fast.gemm(a, b).double()
    ub, k = 2.0 ** -9, qa.shape[1]
    gamma = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    bound = (2 * ub + ub * ub + gamma) * (qa.abs() @ qb.abs().T)
    assert bool(((got.cpu() - exact.cpu()).abs() <= bound.cpu()).all())
    assert not torch.equal(got, exact)  # the bf16 rounding is really there for this format


# -- selection errors -------------------------------------------------------------------------------
def test_cpu_tensors_without_the_interpreter_are_refused_in_one_line(monkeypatch, backends):
    _, tr, _ = backends
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    op = operand(torch.randn(16, 64), "int4", {}, "rtne", None)
    with pytest.raises(ValueError, match="need CUDA tensors .*TRITON_INTERPRET=1"):
        tr.quantize(op)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        tr.check_device(torch.device("cpu"))


def test_missing_triton_is_a_one_line_error(monkeypatch):
    from megatron_ufp4.linear import triton_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(ValueError, match="needs the triton package: pip install triton"):
        triton_backend.TritonBackend()


# -- tensor parallel ----------------------------------------------------------------------------------
def _tp_layer_bits(rank, world):
    """Column (plain, [gate; up] strided, sequence parallel) and row layers at TP=2: the triton run
    of each rank's shard equals the emulated run of the same shard, bit for bit (the emulated TP
    layers are checked against a single process in test_tensor_parallel.py)."""
    from megatron_ufp4.parallel.state import build_parallel_state
    from megatron_ufp4.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    torch.set_num_threads(1)
    st = build_parallel_state(tp=world)
    out = {}
    for recipe in ("ufp4", "nvfp4", "mxfp4"):
        for kind, cls, kw, in_f, out_f in (("column", ColumnParallelLinear, {}, 64, 128),
                                           ("gate_up_sp", ColumnParallelLinear,
                                            {"partition_stride": 2, "sequence_parallel": True}, 64, 128),
                                           ("row", RowParallelLinear, {}, 128, 64)):
            runs = []
            for backend in ("emulated", "triton"):
                torch.manual_seed(20 + rank)
                lin = cls(in_f, out_f, True, recipe, state=st, sr_seed=4, backend=backend, **kw)
                lin.step_context.at(2, 0)
                x = torch.randn(2, 8, lin.weight.shape[1] if kind == "row" else in_f, requires_grad=True)
                y = lin(x)
                y.backward(torch.randn_like(y))
                runs.append([t.detach().clone() for t in (y, x.grad, lin.weight.grad)])
            out[f"{recipe} {kind}"] = all(torch.equal(bits(a), bits(b)) for a, b in zip(*runs))
    return out


@pytest.mark.skipif(DEVICE != "cpu", reason="gloo ranks on CPU tensors: the interpreter run covers it")
def test_tensor_parallel_layers_on_triton_equal_emulated():
    from dist_utils import run_ranks

    for rank_result in run_ranks(2, _tp_layer_bits):
        assert all(rank_result.values()), rank_result


def test_trainer_refuses_triton_on_a_cpu_without_the_interpreter(monkeypatch, tmp_path):
    from conftest import TINY_MODEL, TINY_RUN
    from megatron_ufp4.config import load_config
    from megatron_ufp4.training.trainer import Trainer

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = load_config(None, TINY_MODEL + TINY_RUN + ["gemm.backend=triton", "training.device=cpu",
                                                     f"training.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"^gemm.backend=triton \(training.device=cpu\): the triton kernels need"):
        Trainer(cfg, console=lambda *a, **k: None)
    assert not (tmp_path / "run").exists()  # refused before anything was created


@pytest.mark.parametrize("fmt,opts", [("nvfp4", {}), ("nvfp4", {"block_2d": True})], ids=str)
def test_tensor_amax_pre_pass_equals_the_reference(backends, fmt, opts):
    """One-read NVFP4 pre-pass: after the RHT, over finite blocks only (a NaN block and an Inf block
    must not poison it), 40 rows: a partial row tile."""
    em, tr, _ = backends
    f = make_format(fmt, **opts)
    x = sample((48, 256), seed=11)
    x[17, 3], x[40, 200] = float("nan"), float("inf")
    for rht in (None, RHT(16, 1), RHT(128, 2)):
        want = em.tensor_amax(x, f, rht)
        got = tr.tensor_amax(x, f, rht)
        assert got.shape == () and torch.equal(bits(got), bits(want)), (rht, got, want)
        assert bool(torch.isfinite(got)) and got > 0


# -- both forms of one tensor from one read --------------------------------------------------------
PAIRS = [  # (row-wise: format, options, rounding, RHT size), (column-wise: ...): the recipes' dY uses and more
    (("int4", {}, "sr", 16), ("int4", {}, "sr", 16)),  # UFP4: RHT and SR on both
    (("e2m1", {}, "sr", 0), ("e2m1", {}, "sr", 16)),  # E2M1 reference: RHT on Wgrad only
    (("nvfp4", {}, "sr", 0), ("nvfp4", {}, "sr", 16)),  # NVFP4: two tensor amaxes
    (("mxfp4", {}, "sr", 32), ("mxfp4", {"scale_mode": "rceil"}, "rtne", 32)),
    (("nvfp4", {"block_2d": True}, "rtne", 0), ("nvfp4", {"block_2d": True}, "rtne", 0)),  # W and W^T
    (("int4", {}, "rtne", 128), ("nvfp4", {}, "sr", 64)),
]


@pytest.mark.parametrize("first,second", PAIRS, ids=[f"{a[0]}{a[3]}-{b[0]}{b[3]}" for a, b in PAIRS])
def test_row_and_column_wise_operands_from_one_read_equal_two_quantizations(backends, first, second):
    em, tr, fast = backends
    x = sample((64, 256), seed=12)
    x[5, 9] = float("nan")  # one non-finite block in each form
    ops = []
    for (fmt, opts, rounding, n), t, index in ((first, x, SRIndex(row_offset=3)),
                                               (second, x.t(), SRIndex(col_offset=2 ** 31 - 40, row_stride=2 ** 31))):
        ops.append(operand(t, fmt, opts, rounding, RHT(n, 7) if n else None, index=index, key=len(ops) + 100))
    row, col = tr.quantize_pair(*ops)
    want_row, want_col = em.quantize_pair(*ops)
    assert_same_bits(row, want_row, "row-wise")
    assert_same_bits(col, want_col, "column-wise")
    assert col.is_contiguous() and col.shape == (256, 64)
    brow, bcol = fast.quantize_pair(*ops)
    assert_same_bits(bcol, want_col.to(torch.bfloat16), "column-wise bf16")


# -- packed codes and scales ---------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ["rtne", "sr"])
@pytest.mark.parametrize("fmt,opts", FORMATS, ids=FORMAT_IDS)
def test_packed_codes_and_scales_equal_the_reference_storage(fmt, opts, rounding):
    """The optional second output: fp4.quantize's packed codes (signed zeros as code 8), stored scales
    in their storage dtype and the NVFP4 tensor scale, with the dequantized values, from one pass."""
    from megatron_ufp4.fp4.quantize import quantize
    from megatron_ufp4.linear.triton_backend import quantize_packed

    x = sample((48, 256), seed=13)
    for rht in (None, RHT(32, 4)):
        op = operand(x, fmt, opts, rounding, rht, index=SRIndex(row_offset=5))
        want = quantize(x, op.quant.fmt, rounding=rounding, rht=rht, tensor_amax=op.tensor_amax,
                        sr_index=op.sr_index, sr_key=op.sr_key)
        out, packed, scales, tscale = quantize_packed(op)
        assert torch.equal(packed.cpu(), want.packed().cpu()), (fmt, opts, rht)
        assert scales.dtype == want.scales.dtype and scales.shape == want.scales.shape
        as_ints = (lambda t: t.cpu().view(torch.uint8)) if scales.element_size() == 1 else bits
        assert torch.equal(as_ints(scales), as_ints(want.scales)), (fmt, opts, rht)
        assert (tscale is None) == (want.tensor_scale is None)
        if tscale is not None:
            assert torch.equal(bits(tscale.reshape(())), bits(want.tensor_scale.reshape(())))
        assert_same_bits(out, want.dequantize(rotated=True), "values")
        none, packed_only, scales_only, _ = quantize_packed(op, values=False)  # codes and scales alone
        assert none is None and torch.equal(packed_only, packed) and torch.equal(as_ints(scales_only), as_ints(scales))


def test_packed_scale_of_a_non_finite_block_is_nan():
    """Packed storage must not turn a NaN/Inf block into finite numbers (the native GEMM reads it)."""
    from megatron_ufp4.linear.triton_backend import quantize_packed

    x = sample((32, 128), seed=14)
    x[2, 5], x[20, 70] = float("nan"), float("inf")
    for fmt in ("int4", "nvfp4", "mxfp4"):
        op = operand(x, fmt, {}, "rtne", None)
        _, _, scales, _ = quantize_packed(op)
        s = scales.float().cpu()
        blk = 32 if fmt == "mxfp4" else 16
        assert bool(torch.isnan(s[2, 5 // blk])) and bool(torch.isnan(s[20, 70 // blk])), fmt
        assert int(torch.isnan(s).sum()) == 2, fmt
