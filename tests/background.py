"""Checks whose whole work is other processes, run as background jobs of the test session.

The full GPU-kernel compile (tools/compile_kernels.py, every configuration for sm_90 and
sm_100) and the compiled quantizer's cross-target probes (tests/helpers/cpu_target_probes.py,
two cold Inductor compiles one after the other) need nothing from the session but CPU time.
When its test is collected, a job starts at the lowest CPU priority (nice 19), so it takes
mostly the cycles the mostly one-threaded tests leave idle (processes a test starts in a
session of their own, as the fault tests do, are another Linux autogroup and share the CPU
with it evenly); the test, reached later, waits for the job's result.  Run alone, the test
starts its job itself.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _kernel_compile(work: Path) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for a GPU target
    env.update(PYTHONPATH=str(REPO_ROOT), TRITON_CACHE_DIR=str(work / "triton"))
    return [sys.executable, str(REPO_ROOT / "tools" / "compile_kernels.py"), "--jobs", "1"], env


def _cpu_target_probes(work: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return [sys.executable, str(REPO_ROOT / "tests" / "helpers" / "cpu_target_probes.py"), str(work / "inductor")], env


# job name -> (the test that reads it, what it runs, the module it needs or None)
JOBS = {
    "kernel_compile": ("test_triton_compile.py::test_every_kernel_configuration_compiles_for_hopper_and_blackwell"
                       "_without_spills", _kernel_compile, "triton"),
    "cpu_target_probes": ("test_fused_cpu_targets.py::test_compiled_quantizer_is_not_reused_across_cpu_targets",
                          _cpu_target_probes, None),
}

_running: dict = {}


def start(name: str) -> None:
    """Start job ``name`` (once per process) in a fresh work directory, at nice 19."""
    if name in _running:
        return
    work = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    argv, env = JOBS[name][1](work)
    out, err = (work / "stdout").open("w"), (work / "stderr").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True, preexec_fn=lambda: os.nice(19))
    _running[name] = dict(proc=proc, work=work, files=(out, err))
    if len(_running) == 1:
        atexit.register(_stop)


def start_collected(nodeids) -> None:
    """Start the job of every collected test that reads one."""
    for name, (test, _, needs) in JOBS.items():
        if any(n.endswith(test) for n in nodeids) and (needs is None or importlib.util.find_spec(needs)):
            start(name)


def result(name: str, timeout: float = 900) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of job ``name``, waiting for it."""
    start(name)
    job = _running[name]
    job["proc"].wait(timeout=timeout)
    for f in job["files"]:
        f.close()
    return job["proc"].returncode, (job["work"] / "stdout").read_text(), (job["work"] / "stderr").read_text()


def _stop() -> None:
    for job in _running.values():
        if job["proc"].poll() is None:
            job["proc"].kill()
