"""The full GPU-kernel compile check (tools/compile_kernels.py, every configuration for sm_90
and sm_100) as a background process of the test session.

It is a CPU job of its own: started when the test that reads it is collected, it runs on
the core the mostly one-threaded tests leave idle (``--jobs 1``) while the suite goes on,
and the test (late in the suite) waits for it.  Run alone, the test starts it itself.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST = "test_triton_compile.py::test_every_kernel_configuration_compiles_for_hopper_and_blackwell_without_spills"

_job: dict = {}


def start(jobs: int = 1) -> None:
    """Start the compile (once per process) in a fresh Triton cache, without the interpreter."""
    if _job:
        return
    work = Path(tempfile.mkdtemp(prefix="kernel_compile_"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO_ROOT), TRITON_CACHE_DIR=str(work / "triton"))
    out, err = (work / "stdout").open("w"), (work / "stderr").open("w")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tools" / "compile_kernels.py"), "--jobs", str(jobs)],
                            env=env, stdout=out, stderr=err, text=True)
    _job.update(proc=proc, work=work, files=(out, err))
    atexit.register(_stop)


def result(timeout: float = 900) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the compile, waiting for it."""
    start()
    proc = _job["proc"]
    proc.wait(timeout=timeout)
    for f in _job["files"]:
        f.close()
    work = _job["work"]
    return proc.returncode, (work / "stdout").read_text(), (work / "stderr").read_text()


def _stop() -> None:
    proc = _job.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
