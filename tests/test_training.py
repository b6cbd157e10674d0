"""The training loop: learning-rate schedules, non-finite step skipping and aborting, gradient
accumulation, and loss going down on real text (bf16 and UFP4)."""
from __future__ import annotations

import math

import pytest
import torch

try:  # tests/ as a package (with __init__.py) or as a plain directory on sys.path
    from .conftest import CONFIGS, quiet, read_metrics, wrap_loss
except ImportError:
    from conftest import CONFIGS, quiet, read_metrics, wrap_loss
from megatron_ufp4.training import trainer as trainer_module
from megatron_ufp4.training.schedule import lr_at
from megatron_ufp4.training.trainer import Trainer, TrainingAborted


pytestmark = [pytest.mark.numerical, pytest.mark.usefixtures("single_thread")]

# -- schedules (expected values computed by hand) ----------------------------------------------------
def lrs(kind, total, warmup, base=1.0, min_ratio=0.1, decay_fraction=0.2, steps=None):
    return [lr_at(s, total, base, kind, warmup, min_ratio, decay_fraction) for s in (steps or range(total))]


def test_linear_warmup():
    # step s < warmup: base * (s + 1) / warmup, the same for every kind
    for kind in ("cosine", "wsd", "constant"):
        assert lrs(kind, 100, 4, base=2.0, steps=[0, 1, 2, 3]) == pytest.approx([0.5, 1.0, 1.5, 2.0], rel=1e-15)


def test_cosine_values():
    # total 14, warmup 4: progress (s - 4) / 10; lr = 0.1 + 0.45 * (1 + cos(pi * progress))
    got = lrs("cosine", 14, 4, steps=[4, 5, 9, 13, 14, 20])
    want = [1.0,
            0.1 + 0.45 * (1 + 0.9510565162951535),  # cos(0.1 pi)
            0.55,  # progress 0.5: halfway between peak and floor
            0.1 + 0.45 * (1 - 0.9510565162951535),  # cos(0.9 pi)
            0.1,  # progress 1: the floor
            0.1]  # past the end: stays at the floor
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == 1.0 and got[2] == pytest.approx(0.55, abs=1e-15)


def test_cosine_without_warmup_starts_at_peak():
    assert lrs("cosine", 10, 0, base=3e-4, min_ratio=0.0, steps=[0, 5]) == pytest.approx([3e-4, 1.5e-4], rel=1e-12)


def test_wsd_values():
    # total 10, warmup 2, decay_fraction 0.2: 2 decay steps (8, 9); stable at the peak before
    got = lrs("wsd", 10, 2)
    assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55, 0.1], rel=1e-12)
    # total 20, decay_fraction 0.25: 5 decay steps 15..19, each 0.18 lower, ending at the floor
    got = lrs("wsd", 20, 0, decay_fraction=0.25, steps=range(14, 20))
    assert got == pytest.approx([1.0, 0.82, 0.64, 0.46, 0.28, 0.1], rel=1e-12)


def test_constant_values():
    assert lrs("constant", 6, 2, base=4.0) == pytest.approx([2.0, 4.0, 4.0, 4.0, 4.0, 4.0], rel=1e-15)
    assert lrs("constant", 3, 0, base=4.0) == [4.0, 4.0, 4.0]


def test_unknown_schedule_kind():
    with pytest.raises(ValueError, match="linear"):
        lr_at(5, 10, 1.0, "linear", 2, 0.1, 0.2)


def test_trainer_applies_the_schedule(tiny_cfg, tmp_path):
    """The optimizer's lr during each step is lr_at(step) (checked inside the model's forward)."""
    cfg = tiny_cfg("tiny_dense", tmp_path, "recipe.name=bf16", "training.train_steps=4", "training.eval_interval=0",
                   "checkpoint.save_final=false", "optimizer.lr=1e-3", "schedule.kind=wsd",
                   "schedule.warmup_steps=2", "schedule.decay_fraction=0.25", "schedule.min_lr_ratio=0.5")
    trainer = Trainer(cfg, console=quiet)
    seen = []

    def record_lr(loss):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        return loss

    wrap_loss(trainer, record_lr)
    trainer.train()
    want = [5e-4, 1e-3, 1e-3, 5e-4]  # warmup 2, stable 1, one decay step to 0.5 * lr
    assert [s[0] for s in seen] == pytest.approx(want, rel=1e-12)
    assert all(len(set(s)) == 1 for s in seen)  # decayed and undecayed groups alike
    assert [r["lr"] for r in read_metrics(tmp_path)] == pytest.approx(want, rel=1e-12)


# -- non-finite steps -----------------------------------------------------------------------------------
NAN_RUN = ["recipe.name=bf16", "training.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
           "schedule.kind=constant", "schedule.warmup_steps=0"]


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_nan_step_is_skipped_and_training_continues(tiny_cfg, tmp_path):
    trainer = Trainer(tiny_cfg("tiny_dense", tmp_path, *NAN_RUN, "training.train_steps=5"), console=quiet)
    entering = {}  # step (1-based) -> parameters when that step starts

    def nan_at_step_3(loss):
        step = trainer.step + 1
        entering[step] = params_of(trainer.model)
        return loss * float("nan") if step == 3 else loss

    wrap_loss(trainer, nan_at_step_3)
    result = trainer.train()
    final = params_of(trainer.model)

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and result["step"] == 5
    assert [r["skipped"] for r in records] == [0, 0, 1, 0, 0]
    assert [r["skipped_total"] for r in records] == [0, 0, 1, 1, 1]
    assert records[2]["loss"] is None and records[2]["grad_norm"] is None  # NaN is written as JSON null
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    # step 3 changed nothing; the steps around it did change the parameters
    for name in final:
        assert torch.equal(entering[4][name], entering[3][name]), name
    assert any(not torch.equal(entering[3][n], entering[2][n]) for n in final)
    assert any(not torch.equal(final[n], entering[5][n]) for n in final)
    assert all(torch.isfinite(p).all() for p in final.values())
    # AdamW stepped 4 times, not 5 (its moments never saw the NaN gradient)
    states = trainer.optimizer.state_dict()  # {fqn: {exp_avg, exp_avg_sq, step}}
    assert set(states) == set(final)  # every parameter has AdamW state
    for state in states.values():
        assert float(state["step"]) == 4.0
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
    assert trainer.skipped_total == 1 and trainer.consecutive_nonfinite == 0


def test_isolated_nan_steps_do_not_abort(tiny_cfg, tmp_path):
    cfg = tiny_cfg("tiny_dense", tmp_path, *NAN_RUN, "training.train_steps=5", "training.max_consecutive_nonfinite=2")
    trainer = Trainer(cfg, console=quiet)
    wrap_loss(trainer, lambda loss: loss * (float("inf") if trainer.step + 1 in (2, 4) else 1.0))
    assert trainer.train()["step"] == 5
    assert [r["skipped_total"] for r in read_metrics(tmp_path)] == [0, 1, 1, 2, 2]


def test_nan_every_step_aborts(tiny_cfg, tmp_path):
    cfg = tiny_cfg("tiny_dense", tmp_path, *NAN_RUN, "training.train_steps=10", "training.max_consecutive_nonfinite=3")
    trainer = Trainer(cfg, console=quiet)
    before = params_of(trainer.model)
    wrap_loss(trainer, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingAborted) as info:
        trainer.train()
    msg = str(info.value)
    assert "NaN/Inf" in msg and "3 steps in a row" in msg and "\n" not in msg, msg
    assert trainer.step == 3 and trainer.skipped_total == 3
    after = params_of(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # the step that triggered the stop is in metrics.jsonl, its NaN loss written as JSON null
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] is None for r in records)


def test_a_run_whose_every_step_was_skipped_fails(tiny_cfg, tmp_path):
    """Fewer steps than max_consecutive_nonfinite, all non-finite: nothing was trained, so the
    run must not report success."""
    cfg = tiny_cfg("tiny_dense", tmp_path, *NAN_RUN, "training.train_steps=3", "training.max_consecutive_nonfinite=5")
    trainer = Trainer(cfg, console=quiet)
    wrap_loss(trainer, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingAborted) as info:
        trainer.train()
    msg = str(info.value)
    assert "every step of this run (3) was skipped" in msg and "\n" not in msg, msg
    assert [r["skipped"] for r in read_metrics(tmp_path)] == [1, 1, 1]


def test_train_cli_reports_abort_in_one_line(tiny_overrides, tmp_path, monkeypatch, capsys):
    from megatron_ufp4 import train

    class NanTrainer(Trainer):  # what the CLI builds: every loss NaN
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wrap_loss(self, lambda loss: loss * float("nan"))

    monkeypatch.setattr(trainer_module, "Trainer", NanTrainer)
    args = tiny_overrides("tiny_dense", tmp_path, *NAN_RUN, "training.train_steps=10",
                          "training.max_consecutive_nonfinite=2")
    assert train.main([str(CONFIGS / "tiny_dense.yaml"), *args]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "2 steps in a row" in lines[0], err


# -- gradient accumulation ------------------------------------------------------------------------------
def test_gradient_accumulation_equals_one_large_micro_batch(tiny_cfg, tmp_path):
    # eps=1 turns AdamW's first step into ~SGD (update = g / (|g| + 1)), so the comparison of updated
    # parameters is sensitive to the gradient's scale (Adam's usual g / |g| would hide a 2x error).
    common = ["recipe.name=bf16", "training.dtype=fp32", "training.train_steps=1", "training.global_batch_size=8",
              "schedule.kind=constant", "schedule.warmup_steps=0", "optimizer.lr=1.0", "optimizer.eps=1.0",
              "optimizer.weight_decay=0", "optimizer.grad_clip=0", "training.eval_interval=0"]
    accum = Trainer(tiny_cfg("tiny_dense", tmp_path / "accum", *common, "training.micro_batch_size=4"), console=quiet)
    large = Trainer(tiny_cfg("tiny_dense", tmp_path / "large", *common, "training.micro_batch_size=8"), console=quiet)
    assert (accum.num_micro, large.num_micro) == (2, 1)
    before = params_of(large.model)
    assert all(torch.equal(before[n], p) for n, p in params_of(accum.model).items())  # same seed, same init

    ra, rl = accum.train_step(), large.train_step()
    assert abs(ra["loss"] - rl["loss"]) < 1e-6
    assert ra["grad_norm"] == pytest.approx(rl["grad_norm"], rel=1e-5)
    pa, pl = params_of(accum.model), params_of(large.model)
    biggest = max(float((pl[n] - before[n]).abs().max()) for n in pl)
    assert biggest > 1e-3  # the step moved the parameters far more than the tolerance
    for n in pl:
        torch.testing.assert_close(pa[n], pl[n], rtol=1e-5, atol=1e-5, msg=n)


# -- loss goes down on real text ------------------------------------------------------------------------
def test_loss_decreases_bf16_and_ufp4(tiny_cfg, tmp_path):
    steps, out = 48, {}
    for recipe in ("bf16", "ufp4"):
        cfg = tiny_cfg("tiny_dense", tmp_path / recipe, f"recipe.name={recipe}", f"training.train_steps={steps}",
                       "optimizer.lr=3e-3", "schedule.kind=cosine", "schedule.warmup_steps=4",
                       "training.eval_interval=0", "training.eval_iters=4", "checkpoint.interval=0",
                       "checkpoint.save_final=false")
        trainer = Trainer(cfg, console=quiet)
        val_before = trainer.evaluate()["loss"]
        losses = [trainer.train_step()["loss"] for _ in range(steps)]
        out[recipe] = dict(losses=losses, last=sum(losses[-5:]) / 5, val_before=val_before,
                           val=trainer.evaluate()["loss"])
    for recipe, r in out.items():
        first = r["losses"][0]
        assert first == pytest.approx(math.log(512), abs=0.15), recipe  # uniform over the vocabulary
        assert r["last"] < first - 1.0, (recipe, first, r["last"])
        assert r["val"] < r["val_before"] - 1.0, (recipe, r["val_before"], r["val"])
    # UFP4 trains about as well as bf16 on this scale
    assert abs(out["ufp4"]["last"] - out["bf16"]["last"]) < 0.2, (out["ufp4"]["last"], out["bf16"]["last"])
    assert abs(out["ufp4"]["val"] - out["bf16"]["val"]) < 0.2, (out["ufp4"]["val"], out["bf16"]["val"])
