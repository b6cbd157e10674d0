"""Checkpoint safety under torchrun: a malicious or damaged sharded checkpoint is one line for
the job, a poisoned ``state.pt`` is refused by the real CLIs, and a ``state.pt`` of earlier
versions resumes on two ranks (converted with ``to-dcp``, or directly) keeping every value."""
from __future__ import annotations

import math
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

try:
    from .conftest import CONFIGS, REPO_ROOT, assert_state_equal, read_metrics, snapshot
except ImportError:
    from conftest import CONFIGS, REPO_ROOT, assert_state_equal, read_metrics, snapshot
from megatron_ufp4.training.checkpoint_formats import read_checkpoint
from megatron_ufp4.training.safe_load import verify_dcp_metadata

from checkpoint_attacks import (ENV, PAYLOADS, REFUSED_NAME, _assert_one_rank_line, _copy_run, _damage,
                                _evil_state_pt, _one_line, _System, _torchrun, _tp2)


# One torchrun launch per error family: the job prints one line for all its ranks.  Every
# payload and every kind of damage is refused on resume in one process too
# (test_checkpoint_safety.py: test_bad_sharded_checkpoint_is_one_line_on_resume).
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["exec"])
def test_malicious_metadata_is_refused_on_torchrun_resume(sharded, tmp_path, kind):
    ckpt_src, overrides = sharded
    ckpt = _copy_run(ckpt_src, tmp_path)
    marker = tmp_path / "MARKER"
    (ckpt / ".metadata").write_bytes(pickle.dumps(PAYLOADS[kind](marker)))
    proc = _torchrun(_tp2(overrides, tmp_path / "run"))
    _assert_one_rank_line(proc, f"refusing to load {ckpt / '.metadata'}: it references {REFUSED_NAME[kind]}")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("what", ["garbage_distcp"])
def test_damaged_sharded_checkpoint_is_one_line_on_torchrun_resume(sharded, tmp_path, what):
    ckpt_src, overrides = sharded
    ckpt = _copy_run(ckpt_src, tmp_path)
    needle = _damage(ckpt, what)
    _assert_one_rank_line(_torchrun(_tp2(overrides, tmp_path / "run")), needle)


@pytest.mark.slow
def test_malicious_state_pt_is_refused_by_the_real_clis(tmp_path):
    """The same refusals in real interpreters (stderr as a user sees it, warnings included)."""
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    f = run / "checkpoints" / "step_00000001" / "state.pt"
    _evil_state_pt(f, _System(marker))
    cmds = {"eval": [sys.executable, "-m", "megatron_ufp4.eval", str(run)],
            "sample": [sys.executable, "-m", "megatron_ufp4.sample", str(run)],
            "to-dcp": [sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), "to-dcp", str(f),
                       str(tmp_path / "out")]}
    procs = {k: subprocess.Popen(c, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in cmds.items()}
    for k, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, (k, err[-2000:])
        line = _one_line(err)
        assert str(f) in line and "references posix.system" in line, (k, line)
    assert not marker.exists()


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_torchrun(trained_run, legacy_run, tmp_path, tool):
    """Single-process run stopped after step 2, its checkpoint in the ``state.pt`` form of earlier
    versions -> TP=2 torchrun resume for step 3: the job resumes from the ``state.pt`` itself,
    through a temporary sharded copy that it removes.  That copy is what ``to-dcp`` writes (the
    same ``write_sharded``), whose values are checked in one process
    (test_to_dcp_of_a_single_process_checkpoint_keeps_every_value).

    Reference: the single-process run continued to step 3 (exact: see test_checkpoint).  The
    TP=2 step differs from it only in the order of FP32 sums and, through that, in a rare
    flipped FP4 rounding: the ufp4 bound of test_distributed_training (1e-3 relative)."""
    from megatron_ufp4 import train
    from megatron_ufp4.training.inference import load_trained_model

    src, overrides = trained_run
    ckpt_file = legacy_run[0] / "checkpoints" / "step_00000002" / "state.pt"
    reference = tmp_path / "reference"
    shutil.copytree(src / "checkpoints", reference / "checkpoints")
    ref_over = [*[o for o in overrides if not o.startswith("training.run_dir=")], f"training.run_dir={reference}",
                "training.eval_interval=0"]
    assert train.main([str(CONFIGS / "tiny_dense.yaml"), *ref_over, "--exit-after", "3"]) == 0
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(reference) if "loss" in r}[3]

    run = tmp_path / "dist"
    shutil.copytree(ckpt_file.parent, run / "checkpoints" / "step_00000002")
    proc = _torchrun(_tp2(overrides, run), "--exit-after", "3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".staged")]
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [3], records
    loss = records[0]["loss"]
    assert math.isfinite(loss) and math.isclose(loss, ref_loss, rel_tol=1e-3), (loss, ref_loss)

    # the TP=2 job's own checkpoint (DTensor shards) passes the same verification, and to-single
    # of it loads into the single-process model
    step3 = run / "checkpoints" / "step_00000003"
    verify_dcp_metadata(step3)
    single = tmp_path / "step3.pt"
    assert tool.main(["to-single", str(step3), str(single)]) == 0
    ref_state = read_checkpoint(reference / "checkpoints" / "step_00000003")
    mine = torch.load(single, weights_only=True)
    assert mine["step"] == 3 and set(mine["model"]) == set(ref_state["model"])
    d = tmp_path / "as_single" / "step_00000003"
    d.mkdir(parents=True)
    torch.save({**mine, "config": ref_state["config"]}, d / "state.pt")
    model, _, step = load_trained_model(d)
    assert step == 3


def test_to_dcp_of_a_single_process_checkpoint_keeps_every_value(legacy_run, tmp_path, tool, tiny_cfg):
    """to-dcp then to-single of a ``state.pt`` of earlier versions gives back its model and,
    keyed by name, exactly the AdamW state of the trainer it was written from (torch's
    parameter ids mapped in the old optimizer's group order), which a live trainer resumed from
    the same file holds too."""
    from megatron_ufp4.training.trainer import Trainer

    src, overrides, truth = legacy_run
    ckpt = src / "checkpoints" / "step_00000002"
    out = tmp_path / "dcp" / "step_00000002"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tool.main(["to-dcp", str(ckpt / "state.pt"), str(out)]) == 0
        assert tool.main(["to-single", str(out), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert back["step"] == 2 and back["trainer"] == {"step": 2, "skipped_total": 0, "consecutive_nonfinite": 0}
    assert set(back["model"]) == set(state["model"])
    for k, v in state["model"].items():
        if isinstance(v, dict):
            assert all(torch.equal(back["model"][k][f], t) for f, t in v.items()), k
        else:
            assert torch.equal(back["model"][k], v), k
    assert_state_equal(back["model"], truth["model"], "model")
    assert set(back["optimizer"]) == set(truth["optimizer"])
    for fqn, st in truth["optimizer"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back["optimizer"][fqn][field], st[field]), (fqn, field)
        assert float(back["optimizer"][fqn]["step"]) == float(st["step"]) == 2.0
    assert verify_dcp_metadata(out) is not None

    run = tmp_path / "live"
    shutil.copytree(src / "checkpoints", run / "checkpoints")
    trainer = Trainer(tiny_cfg("tiny_dense", run, *[o for o in overrides if "run_dir" not in o]),
                      console=lambda *a: None)
    assert trainer.step == 2
    assert_state_equal(snapshot(trainer.model.state_dict()), truth["model"], "model")
    assert_state_equal(snapshot(trainer.optimizer.state_dict()), truth["optimizer"], "optimizer")
