"""The ``fused`` backend's compiled quantizer on every CPU target: exact in scalar code, and
never reading compiled code made for another target.

Scalar C++ (``ATEN_CPU_CAPABILITY=default``, what Inductor emits without a vector ISA) is
where signed-overflow undefined behaviour shows: the SR hash's int32 products wrapped in
vector registers but, fused into one scalar loop, let the compiler drop a mask and draw other
numbers.  The compiled core therefore hashes in int64 (``quantize._blocks_core``).

The cache:

Inductor's on-disk cache is not keyed by the CPU vector ISA it generated C++ for, so without
our cache-key tag (``megatron_ufp4/fp4/compiled.py``) a graph compiled at one
``ATEN_CPU_CAPABILITY`` and read back at a lower one is rebuilt for other vector widths: at
AVX2 from an AVX-512 entry it returns wrong values (NaN, 1e15) and can abort with a heap
corruption; at ``default`` from an AVX2 entry the C++ does not compile.  Two processes share
one fresh cache directory, the first at the CPU's highest level, the second one level lower;
each quantizes the same tensor through the compiled core with the guard (``fake_quantize(...,
fused=True)``) and then without it (a bare ``torch.compile`` of the same core).  The
probes (tests/helpers/cpu_target_probes.py) run in the background from collection
(tests/background.py).
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

import background
from megatron_ufp4.fp4 import RHT, fake_quantize

pytestmark = pytest.mark.numerical


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the ISA levels are x86 Linux dispatch levels")
def test_compiled_quantizer_is_not_reused_across_cpu_targets():
    # the two probes (tests/helpers/cpu_target_probes.py) ran in the background from collection
    rc, out, err = background.result("cpu_target_probes")
    assert rc == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    levels = report["levels"]
    if len(levels) < 2 or levels[-1] == "default":
        pytest.skip("this CPU offers a single dispatch level")
    writer, reader = levels[-1], levels[-2]
    first, second = report["writer"], report["reader"]
    assert first["rc"] == 0 and first["isa"].split()[0] == writer and first["guarded"] and first["bare"], first
    assert second.get("isa", "").split()[:1] == ["scalar" if reader == "default" else reader], second
    assert second.get("guarded") is True, second  # with the tag: compiled afresh for this target, exact
    # without it the entry made for the other target is reused: wrong values, a crash or a C++ compile error
    assert second.get("bare") is not True or second["rc"] != 0, second


def test_cache_key_tag_names_the_target_and_keeps_the_users_tag():
    from megatron_ufp4.fp4.compiled import cache_key_tag, compile_scope, target_isa

    tag = cache_key_tag()
    assert f"isa={target_isa()}" in tag and f"torch={torch.__version__}" in tag
    with torch.compiler.config.patch(cache_key_tag="site-a"):
        with compile_scope():
            assert torch.compiler.config.cache_key_tag == f"site-a {tag}"
        assert torch.compiler.config.cache_key_tag == "site-a"  # scoped to our calls


def test_compiled_triton_code_divides_and_rounds_as_eager():
    """On a GPU, Inductor lowers our graphs to Triton: within ``compile_scope`` an fp32 division is
    Triton's IEEE ``div_rn`` (by default the approximate ``/``, which changes block-scale
    quotients), and kernels compile without FMA contraction or subnormal flushing.  Checked on
    Inductor's own code generators (no GPU needed to ask them)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.codegen.triton import TritonKernel, TritonOverrides

    from megatron_ufp4.fp4.compiled import compile_scope

    class Var(str):
        dtype = torch.float32

    def division() -> str:
        return TritonOverrides.truediv(Var("x"), Var("y"))

    assert division() == "(x / y)"  # torch's default: approximate on NVIDIA GPUs
    with compile_scope():
        assert division() == "triton.language.div_rn(x, y)"
        meta = TritonKernel.triton_meta_common()
        assert meta["enable_fp_fusion"] is False and meta["disable_ftz"] is True
    assert division() == "(x / y)" and not inductor_config.eager_numerics.division_rounding  # scoped


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_fused_sr_in_scalar_code_equals_eager(fmt):
    """``cpp.simdlen=1`` matches no vector ISA: Inductor emits scalar C++, as at the default level."""
    from torch._inductor import config as inductor_config

    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    eager = fake_quantize(x, fmt, rounding="sr", rht=RHT(16, 0), generator=torch.Generator().manual_seed(1))
    with inductor_config.patch({"cpp.simdlen": 1}):
        from megatron_ufp4.fp4.compiled import target_isa

        assert target_isa() == "scalar"
        fused = fake_quantize(x, fmt, rounding="sr", rht=RHT(16, 0), generator=torch.Generator().manual_seed(1),
                              fused=True)
    assert torch.equal(fused, eager)
