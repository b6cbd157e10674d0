"""Checkpoints: exact resume (dense and MoE, UFP4 with SR on dY; from the sharded checkpoints
training writes and from the single-file ``state.pt`` of earlier versions), crash-safe writes,
pruning, corrupt files, contents, incompatible configs, metrics after a crash, and the eval/sample
CLIs."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

try:  # tests/ as a package (with __init__.py) or as a plain directory on sys.path
    from .conftest import (CONFIGS, RESUME_RUN, as_legacy_checkpoint, as_per_expert_single_file, assert_state_equal,
                           quiet, read_metrics, snapshot, wrap_loss)
except ImportError:
    from conftest import (CONFIGS, RESUME_RUN, as_legacy_checkpoint, as_per_expert_single_file, assert_state_equal,
                          quiet, read_metrics, snapshot, wrap_loss)
from megatron_ufp4.config import load_config
from megatron_ufp4.linear import QuantizedLinear
from megatron_ufp4.parallel.build import build_model
from megatron_ufp4.training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from megatron_ufp4.training.checkpoint_formats import read_checkpoint
from megatron_ufp4.training.trainer import Trainer

# What must match bit for bit between an uninterrupted run and a stopped-and-resumed one
# (tokens_per_s and mfu are wall-clock measurements).
EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "skipped", "skipped_total", "val_loss", "val_ppl", "moe")


def exact(record: dict) -> dict:
    return {k: record.get(k) for k in EXACT_KEYS}


def step_names(run_dir) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir)]


# what a checkpoint directory written by training holds (one process: one data file)
SHARDED_FILES = [".metadata", "__0_0.distcp", "config.yaml", "partitions.json"]


def staged_leftovers(run_dir) -> list[str]:
    """Temporary sharded copies of a single file (``checkpoints/.staged-<pid>``) still on disk."""
    root = Path(run_dir) / "checkpoints"
    return [p.name for p in root.iterdir() if p.name.startswith(".staged")] if root.is_dir() else []


pytestmark = [pytest.mark.numerical, pytest.mark.usefixtures("single_thread")]


# -- exact resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sharded", "legacy", "per_expert_single"])
@pytest.mark.parametrize("config", ["tiny_dense", "tiny_moe"])
def test_exact_resume_matches_uninterrupted_run(config, fmt, reference_run, tiny_cfg, tmp_path):
    """Stopped after step 3 and resumed: the same records, final state and optimizer state as the
    uninterrupted run, from the sharded checkpoint training writes and from the same state in
    the single-file forms of earlier versions, which still resume directly: ``legacy`` (the
    single-process trainer's ``state.pt``, numbered AdamW state) and ``per_expert_single`` (a
    to-single file, optimizer state by name), both with one key per routed expert."""
    ref = reference_run(config)
    assert [r["step"] for r in ref["records"]] == [1, 2, 3, 4, 5, 6]
    assert len({r["loss"] for r in ref["records"]}) == 6  # the model really changes from step to step

    first = Trainer(tiny_cfg(config, tmp_path, *RESUME_RUN), console=quiet)
    stopped = first.train(exit_after=3)
    assert stopped["step"] == 3 and first.step == 3
    assert step_names(tmp_path) == ["step_00000003"]
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    assert sorted(os.listdir(ckpt)) == SHARDED_FILES
    if fmt == "legacy":
        as_legacy_checkpoint(first, ckpt)
        assert step_names(tmp_path) == ["step_00000003"] and sorted(os.listdir(ckpt)) == ["config.yaml", "state.pt"]
    elif fmt == "per_expert_single":
        as_per_expert_single_file(first, ckpt)
    del first

    logs = []
    second = Trainer(tiny_cfg(config, tmp_path, *RESUME_RUN), console=logs.append)  # training.resume=auto
    assert second.step == 3 and any("resumed" in line for line in logs)
    assert f"resumed from {ckpt} at step 3" in logs
    assert staged_leftovers(tmp_path) == []  # the temporary sharded copy of a state.pt is gone
    final = second.train()
    assert final["step"] == 6

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(records, ref["records"]):
        assert exact(got) == exact(want), f"step {want['step']}"
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert exact(final) == exact(ref["result"])  # in-memory floats, not only their JSON text
    if config == "tiny_moe":
        assert all("moe" in r for r in records)
    assert_state_equal(snapshot(second.model.state_dict()), ref["model"], "model")
    assert_state_equal(snapshot(second.optimizer.state_dict()), ref["optimizer"], "optimizer")


def test_resume_through_train_cli_exit_after(trained_run, tiny_cfg, tmp_path):
    """``--exit-after 2`` (the CLI) then finishing with the Trainer equals a 4-step run without a stop."""
    run_dir, _ = trained_run
    shutil.copytree(run_dir, tmp_path / "resumed")
    assert step_names(tmp_path / "resumed") == ["step_00000002"]
    extra = ["recipe.name=ufp4", "training.train_steps=4", "training.eval_interval=2", "checkpoint.interval=0",
             "schedule.warmup_steps=1"]
    resumed = Trainer(tiny_cfg("tiny_dense", tmp_path / "resumed", *extra), console=quiet)
    assert resumed.step == 2
    resumed.train()
    straight = Trainer(tiny_cfg("tiny_dense", tmp_path / "straight", *extra), console=quiet)
    straight.train()
    a, b = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "straight")
    assert [exact(r) for r in a] == [exact(r) for r in b] and len(a) == 4
    assert_state_equal(snapshot(resumed.model.state_dict()), snapshot(straight.model.state_dict()))


def test_crashed_run_resumes_and_drops_records_after_checkpoint(reference_run, tiny_cfg, tmp_path):
    ref = reference_run("tiny_dense")
    overrides = [*RESUME_RUN, "checkpoint.interval=3"]
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, *overrides), console=quiet)

    def crash_in_step_5(loss):
        if trainer.step == 4:  # noqa: F821 (the enclosing trainer, deleted after the crash)
            raise RuntimeError("simulated crash in step 5")
        return loss

    wrap_loss(trainer, crash_in_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]  # step 4 logged, never checkpointed
    assert step_names(tmp_path) == ["step_00000003"]
    del trainer

    resumed = Trainer(tiny_cfg("tiny_dense", tmp_path, *overrides), console=quiet)
    assert resumed.step == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # the crashed run's step 4 is gone
    resumed.train()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [exact(r) for r in records] == [exact(r) for r in ref["records"]]


def test_resume_tolerates_a_torn_last_metrics_line(trained_run, tiny_cfg, tmp_path):
    """A run killed while appending to metrics.jsonl leaves a partial last line; resuming must drop it
    (like any record after the checkpoint) instead of failing on it."""
    run_dir, _ = trained_run
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 6.1, "lr": 0.00')  # killed mid-write
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, "recipe.name=ufp4", "training.train_steps=4"), console=quiet)
    assert trainer.step == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_exact_resume_after_a_skipped_step_moe(tiny_cfg, tmp_path):
    """Stopping right after a skipped (non-finite) step: the resumed trainer must hold the same
    training state as the one that kept running, including the MoE load accumulator that feeds the
    next expert-bias update (it is not reset on a skipped step, and not saved)."""
    overrides = ["recipe.name=bf16", "training.train_steps=6", "training.eval_interval=0", "checkpoint.interval=0"]
    first = Trainer(tiny_cfg("tiny_moe", tmp_path, *overrides), console=quiet)
    assert first.cfg.model.expert_bias_rate > 0
    wrap_loss(first, lambda loss: loss * float("nan") if first.step + 1 == 3 else loss)
    first.train(exit_after=3)
    assert first.skipped_total == 1
    resumed = Trainer(tiny_cfg("tiny_moe", tmp_path, *overrides), console=quiet)
    assert resumed.step == 3
    want = dict(first.model.named_buffers())
    got = dict(resumed.model.named_buffers())
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_metrics_records(reference_run):
    """Per-step fields; val_loss only at eval steps; lr equals hand-computed schedule values."""
    lr, lo = 3e-3, 3e-4  # RESUME_RUN: base lr, min_lr_ratio 0.1, warmup 2 of 6 steps
    hand = {
        # cosine over steps 2..6: min + (lr - min) / 2 * (1 + cos(pi * (s - 2) / 4)), s = 0-based step
        "tiny_dense": [lr / 2, lr, lr, lo + (lr - lo) / 2 * (1 + math.sqrt(0.5)), (lr + lo) / 2,
                       lo + (lr - lo) / 2 * (1 - math.sqrt(0.5))],
        # wsd: decay over round(0.2 * 6) = 1 final step, linearly to the minimum
        "tiny_moe": [lr / 2, lr, lr, lr, lr, lo],
    }
    for config, want_lr in hand.items():
        records = reference_run(config)["records"]
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
        for r, want in zip(records, want_lr):
            for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped", "skipped_total"):
                assert key in r, (config, r["step"], key)
            assert math.isfinite(r["loss"]) and 0 < r["grad_norm"] < 100
            assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
            assert r["skipped"] == 0 and r["skipped_total"] == 0
            assert r["lr"] == pytest.approx(want, rel=1e-12), (config, r["step"])
            assert ("val_loss" in r) == (r["step"] in (3, 6))
            if "val_loss" in r:
                assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
                assert abs(r["val_loss"] - r["loss"]) < 1.0
        assert records[0]["loss"] == pytest.approx(math.log(512), abs=0.15)  # ~uniform over the vocabulary
        if config == "tiny_moe":
            for r in records:  # layer 0 dense, layer 1 MoE: 4 x 64 tokens, 2 slots each
                assert list(r["moe"]) == ["1"] and sum(r["moe"]["1"]["load"]) == 4 * 64 * 2


# -- incompatible configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("model.hidden_size=128", "model.hidden_size"),
    ("model.num_layers=3", "model.num_layers"),
    ("recipe.name=bf16", "recipe.name"),
    ("recipe.rht_seed=7", "recipe.rht_seed"),
])
def test_resume_with_incompatible_config(trained_run, tiny_cfg, tmp_path, override, key):
    run_dir, _ = trained_run
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as info:
        Trainer(tiny_cfg("tiny_dense", tmp_path, "recipe.name=ufp4", override), console=quiet)
    msg = str(info.value)
    assert key in msg and "incompatible" in msg and "\n" not in msg, msg
    assert (tmp_path / "metrics.jsonl").read_text() == before  # a refused resume touches nothing


def test_resume_with_compatible_changes(trained_run, tiny_cfg, tmp_path):
    run_dir, _ = trained_run
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, "recipe.name=ufp4", "training.train_steps=10",
                               "training.eval_iters=3", "optimizer.lr=1e-4"), console=quiet)
    assert trainer.step == 2


def test_explicit_resume_path_and_resume_none(trained_run, legacy_run, tiny_cfg, tmp_path):
    run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "step_00000002"
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path / "a", "recipe.name=ufp4", f"training.resume={ckpt}"),
                      console=quiet)
    assert trainer.step == 2
    assert_state_equal(snapshot(trainer.model.state_dict()), read_checkpoint(ckpt)["model"])
    # the same state as a single state.pt of earlier versions, given as a file
    legacy = legacy_run[0] / "checkpoints" / "step_00000002" / "state.pt"
    from_file = Trainer(tiny_cfg("tiny_dense", tmp_path / "d", "recipe.name=ufp4", f"training.resume={legacy}"),
                        console=quiet)
    assert from_file.step == 2 and staged_leftovers(tmp_path / "d") == []
    assert_state_equal(snapshot(from_file.model.state_dict()), snapshot(trainer.model.state_dict()))
    assert_state_equal(snapshot(from_file.optimizer.state_dict()), snapshot(trainer.optimizer.state_dict()),
                       "optimizer")
    fresh = Trainer(tiny_cfg("tiny_dense", tmp_path / "b", "recipe.name=ufp4", "training.resume=none"), console=quiet)
    assert fresh.step == 0
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(tiny_cfg("tiny_dense", tmp_path / "c", f"training.resume={tmp_path / 'nope'}"), console=quiet)


@pytest.mark.parametrize("form", ["sharded", "legacy"])
def test_init_from_takes_the_weights_only(trained_run, legacy_run, tiny_cfg, tmp_path, form):
    """``training.init_from``: a fresh run (step 0, no optimizer state) whose weights are the
    checkpoint's, from a sharded checkpoint or a single state.pt; its own SR generators."""
    src = trained_run[0] / "checkpoints" / "step_00000002" if form == "sharded" else \
        legacy_run[0] / "checkpoints" / "step_00000002" / "state.pt"
    saved = read_checkpoint(src)["model"]
    t = Trainer(tiny_cfg("tiny_dense", tmp_path / "run", "recipe.name=ufp4", f"training.init_from={src}"),
                console=quiet)
    assert t.step == 0 and t.optimizer.state_dict() == {} and staged_leftovers(tmp_path / "run") == []
    got = t.model.state_dict()
    weights = [k for k in got if not k.endswith("_extra_state")]
    assert weights and all(torch.equal(got[k], saved[k]) for k in weights)
    fresh = Trainer(tiny_cfg("tiny_dense", tmp_path / "fresh", "recipe.name=ufp4"), console=quiet)
    extra = [k for k in got if k.endswith("_extra_state")]
    assert all(torch.equal(got[k]["sr_generator"], fresh.model.state_dict()[k]["sr_generator"]) for k in extra)
    assert not all(torch.equal(got[k], fresh.model.state_dict()[k]) for k in weights)  # the weights did change


# -- what a checkpoint holds ---------------------------------------------------------------------------
def test_checkpoint_contents(trained_run):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_ufp4.training.safe_load import verify_dcp_metadata

    run_dir, overrides = trained_run
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == SHARDED_FILES
    md = verify_dcp_metadata(ckpt)  # no pickled objects: every entry is a tensor
    assert md.state_dict_metadata and all(type(v) is TensorStorageMetadata for v in md.state_dict_metadata.values())
    assert {k.split(".", 1)[0] for k in md.state_dict_metadata} == {"model", "optim", "trainer"}
    state = read_checkpoint(ckpt)
    cfg = load_config(CONFIGS / "tiny_dense.yaml", overrides)
    assert state["config"] == cfg.to_dict()  # the resolved config
    assert json.loads((ckpt / "partitions.json").read_text())["config"] == cfg.to_dict()
    assert yaml.safe_load((ckpt / "config.yaml").read_text()) == cfg.to_dict()
    assert state["step"] == 2
    assert state["trainer"] == {"step": 2, "skipped_total": 0, "consecutive_nonfinite": 0}

    # SR generator states and RHT signs of every quantized linear, as model '_extra_state' entries
    recipe, _ = cfg.build_recipe()
    [fresh] = build_model(cfg)
    assert set(state["model"]) == set(fresh.state_dict())
    linears = {n: m for n, m in fresh.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(linears) == 2 * 4  # attn.qkv, attn.proj, mlp.gate_up, mlp.down per layer
    extra = {k[: -len("._extra_state")]: v for k, v in state["model"].items() if k.endswith("._extra_state")}
    assert set(extra) == set(linears)
    for name, lin in linears.items():
        signs = extra[name]["rht_signs"]
        assert signs.shape == (recipe.rht_size,) and set(signs.abs().tolist()) == {1.0}
        assert torch.equal(signs, lin.gemms.rht.signs)
        gen = extra[name]["sr_generator"]
        assert gen.dtype == torch.uint8
        torch.Generator().set_state(gen)  # a loadable generator state (used outside training positions)

    # optimizer: AdamW moments for every parameter (by name, shaped like it), 2 steps taken
    params = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    opt = state["optimizer"]
    assert set(opt) == set(params)
    for fqn, s in opt.items():
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(s) and float(s["step"]) == 2.0
        assert s["exp_avg"].shape == s["exp_avg_sq"].shape == params[fqn].shape, fqn
        assert s["exp_avg"].abs().sum() > 0


# -- crash-safe writes, pruning, corrupt files -----------------------------------------------------------
class SimulatedCrash(Exception):
    pass


@pytest.mark.parametrize("exc", [SimulatedCrash, KeyboardInterrupt])
def test_crash_before_rename_leaves_previous_checkpoint(tiny_cfg, tmp_path, exc):
    overrides = ["recipe.name=ufp4", "training.train_steps=4", "training.eval_interval=0", "checkpoint.interval=2"]
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, *overrides), console=quiet)
    trainer.train(exit_after=2)
    good = snapshot(read_checkpoint(tmp_path / "checkpoints" / "step_00000002"))
    trainer.train_step()  # step 3, then a crash while writing its checkpoint
    seen = []

    def crash(tmp):
        seen.append(sorted(p.name for p in Path(tmp).iterdir()))
        raise exc("simulated crash")

    with pytest.raises(exc):
        trainer.save(_before_rename=crash)
    assert seen == [SHARDED_FILES]  # the crash came after the data was written
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]  # no step 3, no tmp dir
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert_state_equal(read_checkpoint(latest_checkpoint(tmp_path)), good)

    # crash while re-saving the same step (the replace path): the old one stays intact
    resumed = Trainer(tiny_cfg("tiny_dense", tmp_path, *overrides), console=quiet)
    assert resumed.step == 2
    assert_state_equal(snapshot(resumed.model.state_dict()), good["model"])
    with pytest.raises(exc):
        resumed.save(_before_rename=crash)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]
    assert_state_equal(read_checkpoint(tmp_path / "checkpoints" / "step_00000002"), good)


def test_leftover_tmp_dir_from_a_killed_writer_is_ignored(trained_run, tiny_cfg, tmp_path):
    run_dir, _ = trained_run
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    tmp = tmp_path / "checkpoints" / "step_00000009.tmp"  # killed mid-write: a shard and its metadata, torn
    tmp.mkdir()
    src = tmp_path / "checkpoints" / "step_00000002"
    for name in (".metadata", "__0_0.distcp"):
        data = (src / name).read_bytes()
        (tmp / name).write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    # the next start resumes from the last complete checkpoint and removes the leftover
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, "recipe.name=ufp4", "training.train_steps=4"), console=quiet)
    assert trainer.step == 2 and not tmp.exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]


def test_keep_last_prunes_to_exactly_n(tiny_cfg, tmp_path):
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, "recipe.name=bf16", "training.eval_interval=0",
                               "checkpoint.interval=0", "checkpoint.keep_last=3"), console=quiet)
    name, w = next(iter(trainer.model.named_parameters()))
    for step in range(1, 6):
        trainer.step = step
        with torch.no_grad():
            w.fill_(float(step))
        trainer.save()
        assert len(list_checkpoints(tmp_path)) == min(step, 3)
    assert step_names(tmp_path) == ["step_00000003", "step_00000004", "step_00000005"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == step_names(tmp_path)
    latest = read_checkpoint(latest_checkpoint(tmp_path))
    assert latest["step"] == 5 and torch.all(latest["model"][name] == 5.0)
    with torch.no_grad():
        w.zero_()
    trainer.save()  # re-save the same step
    assert step_names(tmp_path) == ["step_00000003", "step_00000004", "step_00000005"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == step_names(tmp_path)
    assert torch.all(read_checkpoint(latest_checkpoint(tmp_path))["model"][name] == 0.0)


def test_keep_last_in_training(tiny_cfg, tmp_path):
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, "recipe.name=bf16", "training.train_steps=5",
                               "training.eval_interval=0", "checkpoint.interval=1", "checkpoint.keep_last=2"),
                      console=quiet)
    trainer.train()
    assert step_names(tmp_path) == ["step_00000004", "step_00000005"]


CORRUPTIONS = [b"", b"not a checkpoint at all", "truncated", "pickled_object"]


def _corrupt(f: Path, content) -> None:
    if content == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif content == "pickled_object":  # loadable only by an unrestricted unpickler
        import datetime
        import io
        import pickle

        obj = {"model": {}, "when": datetime.datetime(2024, 1, 1)}
        if f.name == ".metadata":  # a plain pickle, as DCP writes it
            f.write_bytes(pickle.dumps(obj))
        else:
            buf = io.BytesIO()
            torch.save(obj, buf)
            f.write_bytes(buf.getvalue())
    else:
        f.write_bytes(content)


@pytest.mark.parametrize("content", CORRUPTIONS)
@pytest.mark.parametrize("target", ["__0_0.distcp", ".metadata", "legacy state.pt"])
def test_corrupt_checkpoint_is_one_line_checkpoint_error(trained_run, legacy_run, tiny_cfg, tmp_path, target,
                                                         content):
    """A damaged file of the sharded checkpoint training writes, or of a single-file ``state.pt``
    of earlier versions: one line naming the file, from the reader and from a resume."""
    run_dir = (legacy_run if target.startswith("legacy") else trained_run)[0]
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    f = tmp_path / "checkpoints" / "step_00000002" / target.split()[-1]
    _corrupt(f, content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(f.parent)
    msg = str(info.value)
    assert "\n" not in msg and str(f) in msg, msg
    with pytest.raises(CheckpointError) as info:  # resume=auto does not silently start from scratch
        Trainer(tiny_cfg("tiny_dense", tmp_path, "recipe.name=ufp4"), console=quiet)
    msg = str(info.value)
    assert "\n" not in msg and str(f) in msg, msg


def test_missing_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path / "nothing")
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
