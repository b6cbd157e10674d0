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
fused=True)``) and then without it (a bare ``torch.compile`` of the same core).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from megatron_ufp4.fp4 import RHT, fake_quantize

pytestmark = pytest.mark.numerical

PROBE = """
import importlib, json
import torch
from megatron_ufp4.fp4 import fake_quantize
from megatron_ufp4.fp4.compiled import target_isa
Q = importlib.import_module("megatron_ufp4.fp4.quantize")
from megatron_ufp4.fp4.formats import make_format

x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
eager = fake_quantize(x, "int4")
guarded = fake_quantize(x, "int4", fused=True)
print(json.dumps({"isa": target_isa(), "guarded": torch.equal(guarded, eager)}), flush=True)
bare = torch.compile(Q._blocks_core, dynamic=True)(x, make_format("int4"), "rtne", None, None, None, None, True)[0]
print(json.dumps({"bare": torch.equal(bare.reshape(x.shape), eager)}), flush=True)
"""


def _levels() -> list[str]:
    """The dispatch levels this CPU runs, lowest first."""
    out = []
    for level in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
        got = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip().lower()
        if got == level:
            out.append(level)
    return out


def _probe(level: str, cache: str) -> tuple[dict, int]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "TORCHINDUCTOR_CACHE_DIR": cache,
           "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    result = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    return result, proc.returncode


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the ISA levels are x86 Linux dispatch levels")
def test_compiled_quantizer_is_not_reused_across_cpu_targets(tmp_path):
    levels = _levels()
    if len(levels) < 2 or levels[-1] == "default":
        pytest.skip("this CPU offers a single dispatch level")
    writer, reader = levels[-1], levels[-2]
    cache = str(tmp_path / "inductor")
    first, rc = _probe(writer, cache)
    assert rc == 0 and first["isa"].split()[0] == writer and first["guarded"] and first["bare"], (first, rc)
    second, rc = _probe(reader, cache)
    assert second.get("isa", "").split()[:1] == ["scalar" if reader == "default" else reader], second
    assert second.get("guarded") is True, second  # with the tag: compiled afresh for this target, exact
    # without it the entry made for the other target is reused: wrong values, a crash or a C++ compile error
    assert second.get("bare") is not True or rc != 0, (second, rc)


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
