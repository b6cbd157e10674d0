"""How the ``fused`` backend's torch.compile'd quantizer is compiled: limits, numerics, cache key.

Inductor keeps compiled graphs on disk (``TORCHINDUCTOR_CACHE_DIR``, default under /tmp) and
keys them by the graph, torch's source and the GPU, but not by the CPU vector instruction
set it generated C++ for.  Graph code generated for AVX-512 (16-lane vectors) and read back
in a process that targets AVX2 (``ATEN_CPU_CAPABILITY=avx2``, or another node of a cluster
sharing the directory) is rebuilt against 8-lane vectors: it returns garbage and corrupts the
heap.  Every compile of ours therefore carries a cache-key tag naming what the generated code
depends on (torch's version and build, the machine and the vector ISA Inductor targets), so
a process can only ever read entries made for its own target.  The tag is scoped to our
calls (``config.patch``) and appended to any tag the user set.
"""
from __future__ import annotations

import contextlib
import platform

import torch


def target_isa() -> str:
    """The CPU vector ISA Inductor generates code for in this process ("avx512", "avx2", ...,
    "scalar" when vectorization is off, e.g. ``ATEN_CPU_CAPABILITY=default``)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return str(isa) if isa else "scalar"  # an ISA is falsy when Inductor will not vectorize


def cache_key_tag() -> str:
    """What our compiled code depends on beyond what Inductor already hashes."""
    return (f"megatron_ufp4.fused torch={torch.__version__} git={torch.version.git_version} "
            f"machine={platform.machine()} isa={target_isa()}")


# Inductor settings under which its generated code rounds as eager torch does (see compile_scope)
EAGER_NUMERICS = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True,
                  "emulate_precision_casts": True}


@contextlib.contextmanager
def compile_scope():
    """Enter around every call of a compiled quantizer function.

    - one graph per (format, rounding, RHT, 2D, dequantize) a model uses: allow them all, or
      dynamo silently falls back to eager after its default of 8;
    - the on-disk cache key carries ``cache_key_tag()`` (see the module docstring);
    - Inductor's Triton code (CUDA) computes as eager does: ``x / y`` as an IEEE division
      (``div_rn``; by default Triton divides approximately, and the quantizer divides by block
      scales), no FMA contraction of a multiply and an add (``emulate_precision_casts`` is
      Inductor's switch for it) and no flushing of subnormals in library calls.  Otherwise the
      same graph would give other bits on a GPU than on the CPU.
    """
    from torch._inductor import config as inductor

    dynamo = torch._dynamo.config
    limits = {k: max(getattr(dynamo, k), 64) for k in ("recompile_limit", "cache_size_limit") if hasattr(dynamo, k)}
    user_tag = torch.compiler.config.cache_key_tag
    tag = f"{user_tag} {cache_key_tag()}" if user_tag else cache_key_tag()
    with dynamo.patch(**limits), torch.compiler.config.patch(cache_key_tag=tag), \
            inductor.patch(EAGER_NUMERICS):
        yield


def check_compiler(device: torch.device) -> None:
    """Refuse in one line a device our compiled quantizer cannot be compiled for: on a CPU
    Inductor needs a C++ compiler (``CXX`` or g++ on the PATH), on a GPU the triton package;
    otherwise the first forward would fail deep inside Inductor with pages of output."""
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ValueError("the fused backend compiles Triton kernels on a GPU: pip install triton")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler (no compiler found), or one that does not run
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the fused backend compiles C++ with Inductor and found no working C++ compiler "
                         f"({reason[:120]}); install g++ or set CXX, or use gemm.backend=emulated") from None
