"""Precision schedules (``recipe.schedule``): parsing errors, which phase each step runs, and
exactness against independent references: a schedule of base-equal phases is no schedule; a
switching run equals training with one recipe, checkpointing and resuming with the next; a
run stopped in its last phase resumes bit for bit; two data-parallel ranks equal one process."""
from __future__ import annotations

import json
import math

import pytest

try:  # tests/ as a package (with __init__.py) or as a plain directory on sys.path
    from .conftest import CONFIGS, assert_state_equal, quiet, read_metrics, snapshot
except ImportError:
    from conftest import CONFIGS, assert_state_equal, quiet, read_metrics, snapshot
from dist_utils import run_ranks
from megatron_ufp4.config import ConfigError, load_config
from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.fp4.schedule import PrecisionSchedule
from megatron_ufp4.linear import QuantizedLinear, precision_table
from megatron_ufp4.training import dist_checkpoint
from megatron_ufp4.training.run_info import read_run_info
from megatron_ufp4.training.trainer import Trainer

pytestmark = [pytest.mark.numerical, pytest.mark.usefixtures("single_thread")]

FPROP_BF16 = "{x: {format: bf16}, w: {format: bf16}}"  # recipe.fprop: both Fprop operands unquantized
# phase 0 ufp4 at step 0; phase 1 Fprop in high precision from step floor(0.3 * 4 + 1/2) = 1; phase 2 bf16 from step 2
SCHEDULE = ("recipe.schedule=[{from_fraction: 0.3, fprop: {x: {format: bf16}, w: {format: bf16}}}, "
            "{from_step: 2, name: bf16}]")
PHASE_RECIPES = ["recipe.name=ufp4", f"recipe.fprop={FPROP_BF16}", "recipe.name=bf16"]  # the same phases, one each
PHASE_OF_STEP = [0, 1, 2, 2]  # record "step" s + 1 ran step s
RUN = ["recipe.name=ufp4", "training.train_steps=4", "training.eval_interval=2", "checkpoint.interval=0",
       "schedule.warmup_steps=1", "optimizer.lr=3e-3"]
EXACT = ("step", "loss", "lr", "grad_norm", "skipped", "val_loss", "moe")


def exact(records):
    return [{k: r.get(k) for k in EXACT} for r in records]


def _train(cfg, exit_after=None) -> dict:
    trainer = Trainer(cfg, console=quiet)
    try:
        trainer.train(exit_after=exit_after)
        return {"trainer": trainer, "model": snapshot(trainer.model.state_dict()),
                "optimizer": snapshot(trainer.optimizer.state_dict())}
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def scheduled(tiny_cfg, tmp_path_factory):
    """The 4-step MoE run with SCHEDULE, uninterrupted (expert GEMMs grouped while all FP4)."""
    run_dir = tmp_path_factory.mktemp("scheduled")
    out = _train(tiny_cfg("tiny_moe", run_dir, *RUN, SCHEDULE))
    return {**out, "run_dir": run_dir, "records": read_metrics(run_dir)}


# -- parsing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, key, needle", [
    ("[{from_step: 3}, {from_step: 2}]", "recipe.schedule[1].from_step", "strictly increasing"),
    ("[{from_step: 2}, {from_fraction: 0.5}]", "recipe.schedule[1].from_fraction", "step 2"),  # 0.5 * 4 = step 2
    ("[{from_step: 0, name: bf16}]", "recipe.schedule[0].from_step", "base recipe"),
    ("[bf16]", "recipe.schedule[0]", "mapping"),
    ("{from_step: 2}", "recipe.schedule", "list"),
    ("[{from_step: 1, from_fraction: 0.5}]", "recipe.schedule[0]", "exactly one"),
    ("[{name: bf16}]", "recipe.schedule[0]", "neither"),
    ("[{from_fraction: 1.5}]", "recipe.schedule[0].from_fraction", "[0, 1]"),
    ("[{from_fraction: .nan}]", "recipe.schedule[0].from_fraction", "nan"),
    ("[{from_step: -1}]", "recipe.schedule[0].from_step", ">= 0"),
    ("[{from_step: true}]", "recipe.schedule[0].from_step", "True"),
    ("[{from_step: 2, fmt: int4}]", "recipe.schedule[0].fmt", "unknown recipe key"),
    ("[{from_step: 2, schedule: []}]", "recipe.schedule[0].schedule", "unknown recipe key"),
    ("[{from_step: 2, fprop: {foo: 1}}]", "recipe.schedule[0]", "fprop.foo"),
    ("[{from_step: 2, name: nvfp5}]", "recipe.schedule[0]", "nvfp5"),
    ("[{from_step: 2, rht_size: 32}]", "recipe.schedule[0].rht_size", "RHT signs"),
])
def test_schedule_errors_are_one_line_naming_the_field(schedule, key, needle):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_dense.yaml", ["training.train_steps=4", f"recipe.schedule={schedule}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key + ":") and needle in msg, msg


def test_a_shape_a_phase_cannot_run_is_refused_at_build(tiny_cfg, tmp_path):
    # MXFP4 blocks are 32 wide: an MLP of 48 cannot run them; the bf16 base runs any shape
    cfg = tiny_cfg("tiny_dense", tmp_path, *RUN, "model.ffn_hidden_size=48", "recipe.name=bf16", "recipe.rht_size=32",
                   "recipe.schedule=[{from_step: 2, name: mxfp4}]")
    with pytest.raises(ValueError) as e:
        Trainer(cfg, console=quiet)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("recipe.schedule[0]: layers.0.mlp.") and "multiple of 32" in msg, msg


def test_phase_resolution_at_step_boundaries():
    # from_fraction f starts at floor(f * train_steps + 1/2): the nearest step, halves up
    for f, steps, start in [(0.3, 4, 1), (0.25, 10, 3), (0.24, 10, 2), (0.26, 10, 3), (0.9, 200, 180), (1.0, 7, 7),
                            (0.05, 10, 1)]:
        s = PrecisionSchedule.from_config({"name": "ufp4", "schedule": [{"from_fraction": f, "name": "bf16"}]}, steps)
        assert s.phases[1].start == start, (f, steps)
        assert [s.phase_at(i) for i in range(steps)] == [int(i >= start) for i in range(steps)]
    s = PrecisionSchedule.from_config({"name": "ufp4", "schedule": [
        {"from_fraction": 0.5, "fprop": {"x": {"format": "bf16"}, "w": {"format": "bf16"}}},
        {"from_step": 9, "name": "bf16"}]}, 10)
    largest_start = [max(i for i, p in enumerate(s.phases) if p.start <= step) for step in range(10)]
    assert [s.phase_at(step) for step in range(10)] == largest_start == [0] * 5 + [1] * 4 + [2]
    # a phase merges onto the base recipe; naming a preset starts from it
    assert s.recipes[1] == Recipe.from_dict({"name": "ufp4", "fprop": {"x": {"format": "bf16"},
                                                                      "w": {"format": "bf16"}}})
    assert s.recipes[2] == Recipe.preset("bf16")


def test_labels_tell_schedules_apart():
    def label(entries, steps=10):
        return PrecisionSchedule.from_config({"name": "ufp4", "schedule": entries}, steps).label()

    bf16_at = [label([{"from_step": 5, "name": "bf16"}]), label([{"from_step": 6, "name": "bf16"}]),
               label([{"from_step": 5, "fprop": {"x": {"format": "bf16"}, "w": {"format": "bf16"}}}]),
               label([{"from_step": 5, "name": "bf16"}, {"from_step": 6, "name": "ufp4"}]), label([])]
    assert len(set(bf16_at)) == len(bf16_at) and bf16_at[0] == "ufp4>bf16@5" and bf16_at[-1] == "ufp4"
    # the same phases at the same steps are the same training, whichever way the start is written
    assert label([{"from_fraction": 0.5, "name": "bf16"}]) == bf16_at[0]


# -- exactness -------------------------------------------------------------------------------------
def test_schedule_of_base_equal_phases_is_bitwise_no_schedule(tiny_cfg, tmp_path):
    plain = _train(tiny_cfg("tiny_dense", tmp_path / "plain", *RUN))
    same = ("recipe.schedule=[{from_step: 1}, {from_fraction: 0.5, name: ufp4}, {from_step: 3, format: int4, "
            "rht: [fprop, dgrad, wgrad]}]")
    sched = _train(tiny_cfg("tiny_dense", tmp_path / "sched", *RUN, same))
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "sched")
    assert [r["precision_phase"] for r in b] == [0, 1, 2, 3]
    assert exact(a) == exact(b)
    assert_state_equal(plain["model"], sched["model"], "model")
    assert_state_equal(plain["optimizer"], sched["optimizer"], "optimizer")


def test_switching_equals_resuming_with_the_next_recipe(scheduled, tiny_cfg, tmp_path, monkeypatch):
    """The reference never uses a schedule: train step 0 with ufp4 and checkpoint, resume step 1
    with Fprop in high precision and checkpoint, resume steps 2-3 with bf16.  A resume refuses a
    changed recipe (config_differences); here recipe differences are let through."""
    real = dist_checkpoint.config_differences  # the check every resume goes through (load_trainer)
    monkeypatch.setattr(dist_checkpoint, "config_differences",
                        lambda saved, current: [d for d in real(saved, current) if not d.startswith("recipe")])
    for recipe, stop in zip(PHASE_RECIPES, (1, 2, None)):
        last = _train(tiny_cfg("tiny_moe", tmp_path, *RUN, recipe), exit_after=stop)
    assert last["trainer"].precision_schedule.scheduled is False
    ref = read_metrics(tmp_path)
    assert [r["step"] for r in ref] == [1, 2, 3, 4] and len({r["loss"] for r in ref}) == 4
    assert [r["precision_phase"] for r in scheduled["records"]] == PHASE_OF_STEP
    assert exact(scheduled["records"]) == exact(ref)  # losses, gradient norms, validation at steps 2 and 4
    assert_state_equal(scheduled["model"], last["model"], "model")  # incl. SR generators and RHT signs
    assert_state_equal(scheduled["optimizer"], last["optimizer"], "optimizer")


def test_stopped_in_the_last_phase_resumes_bitwise(scheduled, tiny_cfg, tmp_path):
    # with operand statistics every 2 steps: they observe, they change nothing
    cfg = lambda: tiny_cfg("tiny_moe", tmp_path, *RUN, SCHEDULE, "logging.quant_stats_interval=2")  # noqa: E731
    first = _train(cfg(), exit_after=3)["trainer"]
    assert first.step == 3 and first.precision_phase == 2
    second = Trainer(cfg(), console=quiet)
    try:
        assert second.step == 3 and second.model.step_context.phase == 2  # the last step's phase, for evaluation
        second.train()
        assert_state_equal(scheduled["model"], snapshot(second.model.state_dict()), "model")
        assert_state_equal(scheduled["optimizer"], snapshot(second.optimizer.state_dict()), "optimizer")
    finally:
        second.close()
    records = read_metrics(tmp_path)
    assert exact(records) == exact(scheduled["records"])
    # the live telemetry names the phase that ran: step 2 ran phase 1 (Fprop in high precision), step 4 bf16
    stats = {r["step"]: r["quant"] for r in records if "quant" in r}
    assert sorted(stats) == [2, 4] and stats[4] == {}
    label = "ufp4[fprop.x.format=bf16; fprop.w.format=bf16]"
    assert stats[2] and {g["recipe"] for m in stats[2].values() for g in m.values()} == {label}
    assert all("fprop" not in m and "wgrad" in m for m in stats[2].values())  # Fprop ran F.linear-style, unlogged
    assert {(r["precision_phase"], r["precision_recipe"]) for r in records} == {
        (0, "ufp4"), (1, label), (2, "bf16")}


def test_precision_table_and_run_info_show_the_phases(scheduled):
    trainer = scheduled["trainer"]
    table = trainer.precision_schedule.table(4)
    lines = table.splitlines()
    assert lines[1].startswith("phase 0 from step 0: ufp4")
    assert lines[2].startswith("phase 1 from step 1 (recipe.schedule[0]): fprop.x.format=bf16, fprop.w.format=bf16")
    assert lines[3] == "phase 2 from step 2 (recipe.schedule[1]): name=bf16 -> bf16"
    per_layer = precision_table(trainer.model)
    assert "phase 2" in per_layer and "high precision" in per_layer.splitlines()[2]
    info = read_run_info(scheduled["run_dir"])
    assert info["label"] == "ufp4>ufp4[fprop.x.format=bf16; fprop.w.format=bf16]@1>fp32@2"  # bf16 recipe in fp32
    assert [p["from_step"] for p in info["schedule"]] == [0, 1, 2]
    assert info["schedule"][1]["entry"] == {"from_fraction": 0.3, "fprop": {"x": {"format": "bf16"},
                                                                             "w": {"format": "bf16"}}}
    json.dumps(info)
    # every module keeps one SR generator and one set of RHT signs for all its phases
    mods = [m for m in trainer.model.modules() if isinstance(m, QuantizedLinear)]
    assert mods and all(len(m.phases) == 3 for m in mods)
    for m in mods:
        g0 = m.phases[0].gemms
        assert all(p.gemms.generator is g0.generator and p.gemms.rht is g0.rht and p.gemms.sr_seed == g0.sr_seed
                   for p in m.phases)


# -- two data-parallel ranks -----------------------------------------------------------------------
DIST = ["training.micro_batch_size=2", "training.eval_interval=4"]


def _dist_ranks(rank, world, overrides):
    trainer = Trainer(load_config(CONFIGS / "tiny_dense.yaml", overrides), console=lambda *a: None)
    records = [trainer.train_step() for _ in range(trainer.cfg.training.train_steps)]
    return records, trainer.evaluate()["loss"]


def test_two_data_parallel_ranks_follow_the_schedule(tiny_overrides, tmp_path):
    """DP=2 with one micro-batch per rank against one process with two micro-batches.  Each
    rank's gradient is its micro-batch's; the all-reduce adds the two (commutative: the one
    process's 0 + a + b) and halves (exact) where one process scaled each loss by 1/2 (exact),
    and SR keys come from the global micro-batch.  What differs is the FP32 order of the
    gradient-norm sum over the optimizer's shards and of the DP loss mean, ~1e-7 relative
    [measured: losses equal, norms within 1 ulp, weights within 1 ulp].  So the FP4 steps see
    one process's gradients up to that noise in the clipping factor; the bound is 1e-6
    relative (10x the noise), and the switch itself moves the last loss by more than 10x that
    [measured 1.7e-4] (against the same run without a schedule): a trainer that ignored the
    schedule would fail."""
    def run_one(*extra):
        over = tiny_overrides("tiny_dense", tmp_path / f"one{len(extra)}", *RUN, *DIST, *extra)
        one = Trainer(load_config(CONFIGS / "tiny_dense.yaml", over), console=quiet)
        try:
            return [one.train_step() for _ in range(4)], one.evaluate()["loss"]
        finally:
            one.close()

    ref, ref_val = run_one(SCHEDULE)
    plain, _ = run_one()
    over = tiny_overrides("tiny_dense", tmp_path / "dist", *RUN, SCHEDULE, *DIST, "parallel.data=2")
    (records, val), _ = run_ranks(2, _dist_ranks, over)
    assert [r["precision_phase"] for r in records] == [r["precision_phase"] for r in ref] == PHASE_OF_STEP
    assert [r["precision_recipe"] for r in records] == [r["precision_recipe"] for r in ref]
    tol = 1e-6
    for d, r in zip(records, ref, strict=True):
        for k in ("loss", "grad_norm"):
            assert math.isclose(d[k], r[k], rel_tol=tol), (r["step"], k, d[k], r[k])
    assert math.isclose(val, ref_val, rel_tol=tol)
    assert abs(plain[-1]["loss"] - ref[-1]["loss"]) > 10 * tol * ref[-1]["loss"]
