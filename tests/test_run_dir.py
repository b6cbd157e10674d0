"""The run directory: one training at a time, no run silently overwritten, no leftovers kept,
one clear line when a save cannot be written (disk full, read-only file system)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    from .conftest import CONFIGS, REPO_ROOT, quiet, read_metrics
except ImportError:
    from conftest import CONFIGS, REPO_ROOT, quiet, read_metrics
from megatron_ufp4.parallel.state import ParallelState
from megatron_ufp4.training import checkpoint as ckpt_mod
from megatron_ufp4.training.checkpoint import CheckpointError, list_checkpoints
from megatron_ufp4.training.dist_checkpoint import save_distributed
from megatron_ufp4.training.run_dir import RunDirError, RunDirLock
from megatron_ufp4.training.safe_load import load_dcp_full
from megatron_ufp4.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

SHORT = ["recipe.name=bf16", "training.train_steps=2", "training.eval_interval=0", "checkpoint.interval=1",
         "checkpoint.keep_last=5"]


def names(run_dir) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir)]


def save_checkpoint(run_dir, step: int, entries: dict, config_yaml: str, keep_last: int, **kwargs) -> Path:
    """``entries`` saved as checkpoint ``step`` by the writer every trainer save goes through
    (sharded, one process: the trivial parallel layout)."""
    return save_distributed(run_dir, step, entries, ParallelState(), config_yaml, keep_last, **kwargs)


def _lock_holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run-dir lock until killed."""
    code = ("import sys, time; from megatron_ufp4.training.run_dir import RunDirLock; "
            "RunDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         cwd=REPO_ROOT)
    assert p.stdout.readline().strip() == "locked"
    return p


# -- lock ------------------------------------------------------------------------------------------
def test_second_training_in_a_locked_run_dir_is_refused_naming_the_pid(tiny_cfg, tmp_path):
    holder = _lock_holder(tmp_path)
    try:
        with pytest.raises(RunDirError) as info:
            Trainer(tiny_cfg("tiny_dense", tmp_path, *SHORT), console=quiet)
        msg = str(info.value)
        assert f"PID {holder.pid}" in msg and "\n" not in msg, msg
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, *SHORT), console=quiet)
    trainer.train()
    assert names(tmp_path) == ["step_00000001", "step_00000002"]
    trainer.close()


def test_train_cli_refuses_a_locked_run_dir_with_one_line(tiny_overrides, tmp_path):
    holder = _lock_holder(tmp_path)
    try:
        out = subprocess.run([sys.executable, "-m", "megatron_ufp4.train", str(CONFIGS / "tiny_dense.yaml"),
                              *tiny_overrides("tiny_dense", tmp_path, *SHORT)], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(err) == 1 and f"PID {holder.pid}" in err[0], out.stderr


def _other_process_can_lock(run_dir: Path) -> bool:
    code = ("import sys; from megatron_ufp4.training.run_dir import RunDirLock, RunDirError\n"
            "try:\n    RunDirLock(sys.argv[1]).acquire()\nexcept RunDirError:\n    sys.exit(3)")
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO_ROOT).returncode == 0


def test_lock_is_counted_within_a_process_and_released_by_the_last_holder(tmp_path):
    first = RunDirLock(tmp_path).acquire()
    assert first.holder() == os.getpid()  # reading the file does not drop the lock
    second = RunDirLock(tmp_path).acquire()  # a second trainer in this process
    second.release()
    assert not _other_process_can_lock(tmp_path)  # still held by `first`
    first.release()
    assert _other_process_can_lock(tmp_path)


# -- never overwrite a run -------------------------------------------------------------------------
@pytest.fixture
def finished_run(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    t = Trainer(tiny_cfg("tiny_dense", run, *SHORT, "training.train_steps=3"), console=quiet)
    t.train()
    t.close()
    return run


def test_fresh_start_over_an_existing_run_is_refused_and_touches_nothing(finished_run, tiny_cfg):
    before = (finished_run / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError) as info:
        Trainer(tiny_cfg("tiny_dense", finished_run, *SHORT, "training.resume=none"), console=quiet)
    msg = str(info.value)
    assert "training.overwrite" in msg and "\n" not in msg, msg
    assert (finished_run / "metrics.jsonl").read_bytes() == before
    assert names(finished_run) == ["step_00000001", "step_00000002", "step_00000003"]


def test_resume_from_another_runs_checkpoint_into_a_run_dir_is_refused(finished_run, tiny_cfg, tmp_path):
    other = tmp_path / "other"
    t = Trainer(tiny_cfg("tiny_dense", other, *SHORT, "training.train_steps=1"), console=quiet)
    t.train()
    t.close()
    with pytest.raises(RunDirError):
        Trainer(tiny_cfg("tiny_dense", finished_run, *SHORT,
                         f"training.resume={other / 'checkpoints' / 'step_00000001'}"), console=quiet)
    # resuming from the run's own latest checkpoint by path is a continuation, not a clobber
    Trainer(tiny_cfg("tiny_dense", finished_run, *SHORT, "training.train_steps=4",
                     f"training.resume={finished_run / 'checkpoints' / 'step_00000003'}"), console=quiet).close()


def test_overwrite_moves_the_old_run_aside(finished_run, tiny_cfg):
    old_metrics = (finished_run / "metrics.jsonl").read_bytes()
    logs = []
    t = Trainer(tiny_cfg("tiny_dense", finished_run, *SHORT, "training.resume=none", "training.overwrite=true",
                         "training.train_steps=1"), console=logs.append)
    t.train()
    t.close()
    aside = [p for p in finished_run.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and any(str(aside[0]) in line for line in logs), logs
    assert (aside[0] / "metrics.jsonl").read_bytes() == old_metrics
    assert names(aside[0]) == ["step_00000001", "step_00000002", "step_00000003"]
    assert names(finished_run) == ["step_00000001"]  # the new run's checkpoint survives pruning
    assert [r["step"] for r in read_metrics(finished_run)] == [1]


# -- leftovers ---------------------------------------------------------------------------------------
def test_leftovers_of_killed_saves_and_prunes_are_cleaned_at_start(finished_run, tiny_cfg):
    root = finished_run / "checkpoints"
    (root / "step_00000004.tmp-4242").mkdir()
    (root / "step_00000004.tmp-4242" / "state.pt").write_bytes(b"half")
    (root / "step_00000002.del-77").mkdir()
    (root / "step_00000005.tmp").mkdir()  # a sharded save's temporary directory
    partial = root / "step_00000000"  # a prune killed after deleting .metadata
    partial.mkdir()
    (partial / "config.yaml").write_text("x")
    (root / ".staged-31337").mkdir()  # the sharded copy of a single-file checkpoint, its loader killed
    (root / ".staged-31337" / ".metadata").write_bytes(b"complete or not, never a checkpoint of the run")
    logs = []
    t = Trainer(tiny_cfg("tiny_dense", finished_run, *SHORT, "training.train_steps=3"), console=logs.append)
    assert t.step == 3
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002", "step_00000003"]
    assert any("removed 5 incomplete checkpoint directories" in line for line in logs), logs
    t.close()


def test_prune_removes_by_rename_first_and_never_the_new_checkpoint(tmp_path, monkeypatch):
    for step in (5, 9):
        save_checkpoint(tmp_path, step, {"x": torch.zeros(1)}, "", keep_last=5)
    removed = []
    real_rmtree = ckpt_mod.shutil.rmtree
    monkeypatch.setattr("megatron_ufp4.training.checkpoint.shutil.rmtree",
                        lambda p, **kw: (removed.append(Path(p).name), real_rmtree(p, **kw)))
    # an older step number saved last (the trainer refuses to get here; pruning must still not eat it)
    save_checkpoint(tmp_path, 3, {"x": torch.ones(1)}, "", keep_last=1)
    assert names(tmp_path) == ["step_00000003", "step_00000009"]
    pruned = [n for n in removed if n.startswith("step_00000005")]  # (rmtree is also used for the tmp dir)
    assert pruned == [f"step_00000005.del-{os.getpid()}"]


def test_save_fsyncs_files_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(Path, "rename", lambda self, dst: (events.append(("rename", str(dst))),
                                                           real_rename(self, dst))[1])
    final = save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, "a: 1\n", keep_last=2,
                            extra_files={"partitions.json": "{}"})
    order = [(kind, Path(p).name) for kind, p in events]
    tmp_name = "step_00000001.tmp"
    # DCP writes its shard file, then .metadata under a temporary name renamed inside the temporary directory
    assert order == [("fsync", "__0_0.distcp"), ("fsync", ".metadata.tmp"), ("rename", ".metadata"),
                     ("fsync", "config.yaml"), ("fsync", "partitions.json"), ("fsync", tmp_name),
                     ("rename", final.name), ("fsync", "checkpoints")], order
    # every file of the checkpoint was synced before the commit rename
    synced = {name for kind, name in order[:order.index(("rename", final.name))] if kind == "fsync"}
    files = {p.name for p in final.iterdir()}
    assert files == {"__0_0.distcp", ".metadata", "config.yaml", "partitions.json"}, files
    assert files - {".metadata"} <= synced and ".metadata.tmp" in synced


# -- writes that fail ----------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 2.5 MiB file system: the tiny bf16 model's first checkpoint (1.47 MB with AdamW
    moments) fits, the second does not."""
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, "size=2560k"):
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_save_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The write error reaches us with its errno (DCP's writer opens its shard files with Path.open)."""
    import io

    save_checkpoint(tmp_path, 1, {"x": torch.zeros(4)}, "", keep_last=2)
    real_open = io.open

    def full_disk_open(file, mode="r", *a, **kw):
        if str(file).endswith(".distcp") and "w" in mode:
            return real_open("/dev/full", mode, *a, **kw)  # every write fails with ENOSPC
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(io, "open", full_disk_open)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, 2, {"x": torch.zeros(1 << 16)}, "", keep_last=2)
    msg = str(info.value)
    assert "no space left on device" in msg and "step_00000001 is intact" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


def test_disk_full_during_training_on_a_real_small_filesystem(small_disk, tiny_overrides):
    out = subprocess.run([sys.executable, "-m", "megatron_ufp4.train", str(CONFIGS / "tiny_dense.yaml"),
                          *tiny_overrides("tiny_dense", small_disk / "run", *SHORT, "training.train_steps=4",
                                          "checkpoint.keep_last=4")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "no space left on device" in err[0] and "is intact" in err[0], err[0]
    root = small_disk / "run" / "checkpoints"
    assert names(small_disk / "run") and not [p for p in root.iterdir() if ".tmp" in p.name]


def test_read_only_run_dir_gives_one_line(tmp_path, tiny_overrides):
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "ro,size=64k"):
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        out = subprocess.run([sys.executable, "-m", "megatron_ufp4.train", str(CONFIGS / "tiny_dense.yaml"),
                              *tiny_overrides("tiny_dense", mnt / "run", *SHORT)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "not writable" in err[0] and "read-only file system" in err[0].lower(), err[0]


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(tiny_cfg, tmp_path):
    """Only metrics, no checkpoint: resume=auto starts over (its continuation); resume=none is
    still refused."""
    t = Trainer(tiny_cfg("tiny_dense", tmp_path, *SHORT, "checkpoint.interval=0", "checkpoint.save_final=false"),
                console=quiet)
    t.train()
    t.close()
    assert names(tmp_path) == [] and [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with pytest.raises(RunDirError):
        Trainer(tiny_cfg("tiny_dense", tmp_path, *SHORT, "training.resume=none"), console=quiet)
    t = Trainer(tiny_cfg("tiny_dense", tmp_path, *SHORT), console=quiet)
    assert t.step == 0
    t.train()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2] and names(tmp_path) == ["step_00000001",
                                                                                        "step_00000002"]
    t.close()


# what the sharded writer leaves ("step_N.old"), and the pid-suffixed names of older versions
@pytest.mark.parametrize("suffix", ["", "-999"])
def test_a_save_killed_between_its_two_renames_is_restored(finished_run, tiny_cfg, suffix):
    """Re-saving step 3 moves the old step_3 to step_3.old and then renames the new one into
    place; a kill in between leaves .old as the only complete copy: it must come back."""
    root = finished_run / "checkpoints"
    (root / "step_00000003").rename(root / f"step_00000003.old{suffix}")
    (root / f"step_00000003.tmp{suffix}").mkdir()  # the new copy, maybe incomplete
    logs = []
    t = Trainer(tiny_cfg("tiny_dense", finished_run, *SHORT, "training.train_steps=3"), console=logs.append)
    assert t.step == 3 and names(finished_run) == ["step_00000001", "step_00000002", "step_00000003"]
    assert any("restored checkpoint" in line for line in logs), logs
    t.close()


def test_failed_resave_puts_the_old_copy_back(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"x": torch.zeros(4)}, "", keep_last=2)
    real_rename = Path.rename

    def failing_rename(self, dst):
        if self.name.startswith("step_00000001.tmp"):
            raise OSError(28, "No space left on device", str(dst))
        return real_rename(self, dst)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 1, {"x": torch.ones(4)}, "", keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert torch.equal(load_dcp_full(tmp_path / "checkpoints" / "step_00000001")["x"], torch.zeros(4))


def test_overwrite_refuses_to_move_away_the_checkpoint_it_resumes(finished_run, tiny_cfg):
    with pytest.raises(RunDirError, match="lies inside training.run_dir"):
        Trainer(tiny_cfg("tiny_dense", finished_run, *SHORT, "training.overwrite=true",
                         f"training.resume={finished_run / 'checkpoints' / 'step_00000001'}"), console=quiet)
    assert names(finished_run) == ["step_00000001", "step_00000002", "step_00000003"]
