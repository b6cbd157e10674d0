"""The compiled quantizer at two CPU dispatch levels sharing one fresh Inductor cache
(tests/test_fused_cpu_targets.py reads the result; run in the background, tests/background.py).

    python tests/helpers/cpu_target_probes.py CACHE_DIR

Finds the dispatch levels this CPU runs, then runs PROBE at the highest (the writer) and at
the next lower one (the reader), one after the other, both with ``CACHE_DIR`` as
``TORCHINDUCTOR_CACHE_DIR``.  Prints one JSON object: the levels and each probe's results
and exit status.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

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


def levels() -> list[str]:
    """The dispatch levels this CPU runs, lowest first."""
    out = []
    for level in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
        got = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip().lower()
        if got == level:
            out.append(level)
    return out


def probe(level: str, cache: str) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "TORCHINDUCTOR_CACHE_DIR": cache}
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    result = {"rc": proc.returncode, "stderr": proc.stderr[-2000:]}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    return result


def main(cache: str) -> None:
    found = levels() if sys.platform == "linux" else []
    report = {"levels": found}
    if len(found) >= 2:
        report["writer"] = probe(found[-1], cache)
        report["reader"] = probe(found[-2], cache)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
