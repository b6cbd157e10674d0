"""Faults a real job meets, on real processes: SIGTERM / SIGINT preemption (single process and
torchrun), a hung rank (SIGSTOP) under torchrun, and kill -9 at random moments.

Each test launches the real CLI and sends real signals.  Time bounds are generous multiples
of what the work needs (the machine is shared); what is asserted exactly is the outcome:
exit status, the one line, which checkpoint exists, and that training continues from it.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from .conftest import CONFIGS, REPO_ROOT, read_metrics
except ImportError:
    from conftest import CONFIGS, REPO_ROOT, read_metrics
from megatron_ufp4.training.checkpoint import list_checkpoints

LONG = ["recipe.name=bf16", "training.train_steps=100000", "training.eval_interval=0", "checkpoint.interval=0",
        "logging.interval=1", "checkpoint.save_final=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train_cmd(overrides, nproc: int = 0) -> list[str]:
    launch = [sys.executable, "-m", "megatron_ufp4.train"] if not nproc else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "megatron_ufp4.train"]
    return [*launch, str(CONFIGS / "tiny_dense.yaml"), *overrides]


def _start(overrides, nproc: int = 0) -> subprocess.Popen:
    return subprocess.Popen(_train_cmd(overrides, nproc), cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended before {what}: rc {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            _kill_tree(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _metrics_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _children(pid: int) -> dict[int, int]:
    """RANK -> pid of the processes torchrun started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0][5:])] = int(entry.name)
    return ranks


# -- preemption: one process ---------------------------------------------------------------------------
@pytest.mark.slow
def test_signal_saves_a_checkpoint_at_the_step_boundary_and_resume_continues(tiny_overrides, tmp_path):
    """SIGTERM and SIGINT, each sent to a run of its own; the two runs go side by side."""
    cases = {signal.SIGTERM: 143, signal.SIGINT: 130}
    runs = {sig: tmp_path / sig.name for sig in cases}
    procs = {sig: _start(tiny_overrides("tiny_dense", runs[sig], *LONG)) for sig in cases}
    try:
        results = {}
        for sig, proc in procs.items():
            _wait_for(lambda: _metrics_steps(runs[sig]) >= 3, proc, what=f"three logged steps before {sig.name}")
            t0 = time.monotonic()
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
            results[sig] = (proc.returncode, err, time.monotonic() - t0)
    finally:
        for proc in procs.values():
            _kill_tree(proc)
    resumes = {}
    for sig, (rc, err, elapsed) in results.items():
        run = runs[sig]
        assert rc == cases[sig], (sig.name, rc, err[-3000:])
        last = _lines(err)[-1]
        steps = [r["step"] for r in read_metrics(run)]
        saved = [p.name for p in list_checkpoints(run)]
        assert last.startswith(f"stopped by {sig.name} at step {steps[-1]}: saved checkpoint"), err[-2000:]
        assert saved == [f"step_{steps[-1]:08d}"] and steps == list(range(1, steps[-1] + 1))
        assert (run / "checkpoints" / saved[0] / ".metadata").is_file()  # sharded, as on every layout
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved  # no temporary directory left
        assert not [line for line in _lines(err) if "Traceback" in line]
        assert elapsed < 60, elapsed  # the rest of one ~0.1 s step plus one save
        # training.resume=auto continues from it (both resumes side by side)
        resumes[sig] = (steps[-1], saved[0], subprocess.Popen(
            _train_cmd(tiny_overrides("tiny_dense", run, *LONG[:1], "training.eval_interval=0",
                                      f"training.train_steps={steps[-1] + 2}")),
            cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for sig, (last_step, saved, proc) in resumes.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert f"resumed from {runs[sig] / 'checkpoints' / saved} at step {last_step}" in out
        assert [r["step"] for r in read_metrics(runs[sig])] == list(range(1, last_step + 3))


@pytest.mark.slow
def test_save_on_signal_off_keeps_the_default_action(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    proc = _start(tiny_overrides("tiny_dense", run, *LONG, "checkpoint.save_on_signal=false"))
    _wait_for(lambda: _metrics_steps(run) >= 2, proc, what="two logged steps")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM and list_checkpoints(run) == []


# -- preemption and hangs under torchrun -----------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_to_torchrun_saves_a_sharded_checkpoint(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    proc = _start(tiny_overrides("tiny_dense", run, *LONG, "parallel.data=2", "training.global_batch_size=8"), nproc=2)
    _wait_for(lambda: _metrics_steps(run) >= 3, proc, what="three logged steps")
    proc.send_signal(signal.SIGTERM)  # what SLURM / Kubernetes send to the launcher
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    saved = list_checkpoints(run)
    steps = [r["step"] for r in read_metrics(run)]
    assert [p.name for p in saved] == [f"step_{steps[-1]:08d}"] and (saved[0] / ".metadata").is_file(), err[-3000:]
    ours = [line for line in _lines(err) if line.startswith("stopped by")]
    assert ours == [f"stopped by SIGTERM at step {steps[-1]}: saved checkpoint {saved[0]}; "
                    "continue with training.resume=auto"], err[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [saved[0].name]


@pytest.mark.slow
def test_a_hung_rank_makes_the_job_exit_within_the_timeout_with_one_line(tiny_overrides, tmp_path):
    timeout_s = 10
    run = tmp_path / "run"
    proc = _start(tiny_overrides("tiny_dense", run, *LONG, "parallel.data=2", "training.global_batch_size=8",
                                 "checkpoint.interval=2", f"parallel.timeout_s={timeout_s}"), nproc=2)
    try:
        _wait_for(lambda: len(list_checkpoints(run)) >= 1 and _metrics_steps(run) >= 3, proc,
                  what="a checkpoint and three steps")
        ranks = _children(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.monotonic()
        while Path(f"/proc/{ranks[0]}").exists() and time.monotonic() - t0 < timeout_s + 120:
            try:  # a zombie (exited, not yet reaped) counts as exited
                if (Path(f"/proc/{ranks[0]}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.1)
        to_exit = time.monotonic() - t0
        os.kill(ranks[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc)
    # the live rank waits out at most one timeout in its current collective (less if it was
    # already waiting when the peer stopped), then exits
    assert to_exit < timeout_s + 30, to_exit
    ours = [line for line in _lines(err) if line.startswith("error: rank")]
    assert len(ours) == 1, err[-4000:]
    latest = list_checkpoints(run)[-1]
    assert f"parallel.timeout_s={timeout_s} s" in ours[0] and f"last good checkpoint: {latest}" in ours[0], ours
    assert "Traceback" not in "".join(line for line in _lines(err) if "megatron_ufp4" in line)
    print(f"SIGSTOP -> live rank exit: {to_exit:.1f} s (timeout {timeout_s} s)")


# -- kill -9 at random moments ------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_resumable_run(tiny_overrides, tmp_path):
    """Kills land anywhere: in a step, in the middle of a save (one per step here), in a prune.
    After each, training.resume=auto must start from a complete checkpoint and leave nothing
    half-written behind."""
    run = tmp_path / "run"
    rng = random.Random(0)
    common = tiny_overrides("tiny_dense", run, "recipe.name=bf16", "training.eval_interval=0", "logging.interval=1",
                            "checkpoint.interval=1", "checkpoint.keep_last=2", "training.train_steps=100000")
    for _ in range(4):
        before = _metrics_steps(run)
        proc = _start(common)
        _wait_for(lambda: _metrics_steps(run) > before, proc, what="a new step")
        time.sleep(rng.uniform(0.0, 0.5))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    final = subprocess.run(_train_cmd([*common[:-1], f"training.train_steps={_metrics_steps(run) + 1}"]),
                           cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [p.name for p in list_checkpoints(run)] and len(names) == 2, names
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, steps[-1] + 1))  # records after the resumed checkpoint were replaced
