"""Studies: spec errors, override text, the run grid, the statistics against hand values, and a
whole study through the CLI (report numbers recomputed from the runs' files, a second call that
trains nothing, a resumed run equal to an uninterrupted one)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from megatron_ufp4.config import apply_override
from megatron_ufp4.study import runner as study_runner
from megatron_ufp4.study.__main__ import main as study_main
from megatron_ufp4.study.runner import EVAL_FILE, StudyRunner, status
from megatron_ufp4.study.spec import StudyError, load_study, to_override
from megatron_ufp4.study.stats import effective_ratio, fit_power_law, paired_difference, power_law, summary

from conftest import CONFIGS, TINY_MODEL, TINY_RUN

U64 = 2.0 ** -53  # float64 unit roundoff
BASE = str(CONFIGS / "tiny_dense.yaml")
EVAL_WINDOWS = 8


def _overrides(prefix: str) -> dict:
    """The tiny model and run of conftest as a study's overrides mapping; 4 steps, checkpoints at 2 and 4."""
    d = {}
    for o in [*TINY_MODEL, *TINY_RUN]:
        k, _, v = o.partition("=")
        d[k] = yaml.safe_load(v)
    d.update({"data.prefix": prefix, "training.train_steps": 4, "training.eval_interval": 2,
              "training.eval_windows": 4, "checkpoint.interval": 2, "schedule.warmup_steps": 1})
    return d


def _spec(prefix: str, out_dir, **changes) -> dict:
    spec = {"name": "t", "base": BASE, "overrides": _overrides(prefix),
            "arms": {"bf16": {"recipe.name": "bf16"}, "ufp4": {"recipe.name": "ufp4"}},
            "seeds": [1, 2], "eval": {"windows": EVAL_WINDOWS}, "final_window": 2, "out_dir": str(out_dir)}
    spec.update(changes)
    return {k: v for k, v in spec.items() if v is not None}  # None: the key left out


def _write(path: Path, spec) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # arms and points keep their order
    return str(path)


# -- 1. spec errors ------------------------------------------------------------------------------
SPEC_ERRORS = [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"base": None}, "missing 'base'"),
    ({"arms": None}, "missing 'arms'"),
    ({"seeds": None}, "missing 'seeds'"),
    ({"base": "no/such/base.yaml"}, "base: config file not found"),
    ({"arms": {}}, "arms: at least one arm"),
    ({"arms": {"a/b": {"recipe.name": "bf16"}}}, "arms: 'a/b' is not a usable name"),
    ({"arms": {"bf16": {"recipe.name": "bf16"}, "ufp4": "ufp4"}}, "arms.ufp4: expected a mapping"),
    ({"pairs": [["ufp4", "nvfp4"]]}, "pairs: 'nvfp4' is not an arm"),
    ({"pairs": [["ufp4"]]}, "pairs: expected a list of [arm_a, arm_b]"),
    ({"reference": "fp8"}, "reference: 'fp8' is not an arm"),
    ({"arms": {"bf16": {"recipe.name": "bf16"}, "x": {"recipe.name": "nonsense"}}},
     "run x/seed_1: recipe: unknown recipe 'nonsense'"),
    ({"arms": {"bf16": {"training.trian_steps": 3}}}, "run bf16/seed_1: unknown config key 'training.trian_steps'"),
    ({"seeds": 0}, "seeds: expected a count or a list"),
    ({"seeds": [1, 1]}, "seeds: repeated seed"),
    ({"seeds": [1, True]}, "seeds: expected a count or a list"),
    ({"seeds": [-1]}, "seeds: expected a count or a list"),
    ({"final_window": 5}, "final_window: 5 is more than run bf16/seed_1's training.train_steps=4"),
    ({"final_window": 0}, "final_window: must be an integer >= 1"),
    ({"jobs": 0}, "jobs: must be an integer >= 1"),
    ({"eval": {"windows": 0}}, "eval.windows: must be an integer >= 1"),
    ({"eval": {"window": 8}}, "eval: unknown key 'window'"),
    ({"sweep": {"kind": "size", "points": {"s": {}}}}, "sweep.points: a sweep needs at least two points"),
    ({"sweep": {"kind": "depth", "points": {"s": {}, "m": {}}}}, "sweep.kind: must be size or tokens"),
    ({"probes": {"arm": "bf16", "recipes": {"p": {"name": "nonsense"}}}}, "probes.recipes.p: unknown recipe"),
]


@pytest.mark.parametrize("change,message", SPEC_ERRORS, ids=[m.split(":")[0] for _, m in SPEC_ERRORS])
def test_spec_errors_are_one_line_naming_file_and_field(tmp_path, shakespeare_prefix, capsys, change, message):
    path = _write(tmp_path / "study.yaml", _spec(shakespeare_prefix, tmp_path / "out", **change))
    with pytest.raises(StudyError) as e:
        load_study(path)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and message in msg, msg
    for argv in ([path, "--plan"], [path, "--jobs", "1"]):  # refused before anything runs
        assert study_main(argv) == 2
        out = capsys.readouterr()
        err = out.err.strip().splitlines()
        assert len(err) == 1 and err[0] == f"error: {msg}", err
    assert not (tmp_path / "out").exists()


def test_study_file_errors(tmp_path, shakespeare_prefix, capsys):
    missing = tmp_path / "none.yaml"
    with pytest.raises(StudyError, match="study file not found"):
        load_study(missing)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(StudyError, match="top level must be a mapping"):
        load_study(listed)
    path = _write(tmp_path / "study.yaml", _spec(shakespeare_prefix, tmp_path / "out"))
    for argv, words in (([path, "--seeds", "1,1"], "seeds: repeated seed"), ([path, "--seeds", "0"], "seeds:"),
                        ([path, "--seeds", "x"], "--seeds"), ([path, "--jobs", "0"], "--jobs"),
                        ([str(missing), "--plan"], "not found")):
        assert study_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and words in err[0], (argv, err)


# -- 2. override text ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [[1, 2], ["fprop", "wgrad"], [], True, False, 3e-4, 1e20, 0.5, -2.0, 7, 2 ** 40,
                                   "ufp4", "yes", "null", "3e-4", "a b", "a=b", "a #b", "", None,
                                   {"a": 1, "b": [1, {"c": None}]}, "x: y", "[1]", "..."])
def test_to_override_round_trips_through_apply_override(value):
    text = to_override("recipe.rht", value)
    assert text.startswith("recipe.rht=") and "\n" not in text.partition("=")[2].strip("'")
    d: dict = {}
    apply_override(d, text)
    got = d["recipe"]["rht"]
    assert got == value and type(got) is type(value)  # 3e-4 stays a float, "yes"/"null"/"3e-4" stay strings


# -- 3. the grid ---------------------------------------------------------------------------------
def test_run_grid(tmp_path, shakespeare_prefix):
    over = {**_overrides(shakespeare_prefix), "optimizer.lr": 3e-3}
    spec = _spec(shakespeare_prefix, tmp_path / "out", overrides=over,
                 arms={"bf16": {"recipe.name": "bf16"}, "ufp4": {"recipe.name": "ufp4", "optimizer.lr": 1e-3}},
                 sweep={"kind": "size", "points": {
                     "s": {"model.hidden_size": 64},
                     "m": {"model.hidden_size": 96, "training.train_steps": 5, "optimizer.lr": 2e-3}}})
    path = _write(tmp_path / "study.yaml", spec)
    study = load_study(path)
    runs = study.runs()
    assert [(r.point, r.arm, r.seed) for r in runs] == [(p, a, s) for p in "sm" for a in ("bf16", "ufp4")
                                                        for s in (1, 2)]
    for r in runs:
        assert r.key == f"{r.point}/{r.arm}/seed_{r.seed}"
        assert r.run_dir == tmp_path / "out" / "runs" / r.point / r.arm / f"seed_{r.seed}"
        assert r.overrides[-2:] == (f"training.seed={r.seed}", f"training.run_dir={r.run_dir}")
        cfg = study.run_config(r)
        assert (cfg.training.seed, Path(cfg.training.run_dir)) == (r.seed, r.run_dir)
        assert cfg.model.hidden_size == (96 if r.point == "m" else 64)
        assert cfg.training.train_steps == (5 if r.point == "m" else 4)  # the point over the study
        # the arm over the point over the study
        assert cfg.optimizer.lr == (1e-3 if r.arm == "ufp4" else 2e-3 if r.point == "m" else 3e-3)
        assert cfg.recipe["name"] == r.arm
        assert cfg.model.num_layers == 2 and cfg.data.prefix == shakespeare_prefix  # the study's overrides
    # no sweep: <out>/runs/<arm>/seed_<n>; the study's overrides hold on every run unless an arm sets them
    path = _write(tmp_path / "flat.yaml", _spec(shakespeare_prefix, tmp_path / "flat", arms={
        "bf16": {"recipe.name": "bf16"}, "long": {"recipe.name": "ufp4", "training.train_steps": 6}}))
    study = load_study(path, seeds=3)
    assert study.seeds == [1, 2, 3]
    assert [r.run_dir for r in study.runs()] == [tmp_path / "flat" / "runs" / a / f"seed_{s}"
                                                 for a in ("bf16", "long") for s in (1, 2, 3)]
    assert {r.arm: study.run_config(r).training.train_steps for r in study.runs()} == {"bf16": 4, "long": 6}
    assert load_study(path, seeds=[5, 9]).seeds == [5, 9]
    moved = load_study(path, out_dir=str(tmp_path / "elsewhere"))
    assert all(r.run_dir.parent.parent.parent == tmp_path / "elsewhere" for r in moved.runs())
    # training.seed and training.run_dir belong to the study: setting them is refused
    for key, value in (("training.seed", 77), ("training.run_dir", "x")):
        path = _write(tmp_path / "seeded.yaml", _spec(shakespeare_prefix, tmp_path / "seeded", overrides={
            **_overrides(shakespeare_prefix), key: value}))
        with pytest.raises(StudyError, match=f"overrides: {key} is set by the study"):
            load_study(path)
    path = _write(tmp_path / "noref.yaml", {**_spec(shakespeare_prefix, tmp_path / "noref"), "reference": None})
    assert load_study(path).reference is None  # an explicit null: no reference arm


# -- 4. statistics ------------------------------------------------------------------------------
def test_summary_and_paired_difference_by_hand():
    s = summary([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["sd"] == 1.0  # sd = sqrt((1 + 0 + 1) / 2)
    # t(0.975, df=2) in closed form: for df = 2 the t quantile is (2p - 1) / sqrt(2 p (1 - p)) = 4.3026527297494638
    # (mpmath at 30 digits: 4.30265272974946385...).  The interval is 2 -+ t * sd / sqrt(3); scipy's ppf is accurate
    # to a few ulps and the closed form here to ~3 roundings, so 1e-14 relative covers both.
    t975 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert t975 == pytest.approx(4.3026527297494638, rel=4 * U64)
    half = t975 / math.sqrt(3)
    assert s["ci"] == pytest.approx([2 - half, 2 + half], rel=1e-14)
    one = summary([5.0])
    assert (one["n"], one["mean"], one["sd"], one["ci"]) == (1, 5.0, None, None)
    assert summary([])["mean"] is None and summary([])["n"] == 0
    # seeds 1, 2 and 5 in both; 3 only in a, 4 only in b.  Binary fractions: every difference is exact
    d = paired_difference({1: 1.0, 2: 0.5, 3: 2.0, 5: 0.75}, {1: 0.5, 2: 1.0, 4: 9.0, 5: 0.75})
    assert d["per_seed"] == {1: 0.5, 2: -0.5, 5: 0.0}
    assert (d["positive"], d["negative"], d["zero"]) == (1, 1, 1)
    assert d["n"] == 3 and d["mean"] == 0.0 and d["sd"] == 0.5  # sqrt((0.25 + 0.25 + 0) / 2)


XS = [10 ** (5 + k / 2) for k in range(5)]  # 1e5 .. 1e7, half a decade apart


def test_power_law_fit_recovers_exact_parameters():
    ys = [3.0 * x ** -0.4 + 1.5 for x in XS]
    fit = fit_power_law(XS, ys)
    # exact data: the least-squares minimum is the true (A, alpha, E) with zero residual, and the solver stops within
    # its step tolerance (xtol = 1e-8 relative to the parameters, in the fit's scaled units; A = A' min(x)^alpha
    # carries alpha's error times ln(1e5) ~ 12): every parameter within 1e-6 relative
    for k, want in (("A", 3.0), ("alpha", 0.4), ("E", 1.5)):
        assert abs(fit[k] / want - 1) < 1e-6, (k, fit[k])
    assert all(v is not None for v in fit["stderr"].values())  # 5 points, 3 parameters: errors exist
    assert fit_power_law(XS[:2], ys[:2]) is None and fit_power_law([], []) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy: no covariance from an exactly determined fit
        three = fit_power_law(XS[:3], ys[:3])
    assert three["stderr"] == {"A": None, "alpha": None, "E": None}
    assert power_law(1e6, 3.0, 0.4, 1.5) == 3.0 * 1e6 ** -0.4 + 1.5


def test_effective_ratio_recovers_the_factor():
    fit = fit_power_law(XS, [3.0 * x ** -0.4 + 1.5 for x in XS])
    a, alpha, e = fit["A"], fit["alpha"], fit["E"]
    worse = [a * (0.7 * x) ** -alpha + e for x in XS]  # an arm worth 0.7x its parameters, under this very fit
    r = effective_ratio(fit, XS, worse)
    # exact data for the one-parameter model: log r is found to the solver's tolerance (1e-8) -> r within 1e-6
    assert r["ratio"] == pytest.approx(0.7, rel=1e-6)
    r2 = effective_ratio(fit, XS[:2], worse[:2])  # one parameter: two points suffice
    assert r2["ratio"] == pytest.approx(0.7, rel=1e-6)
    assert effective_ratio(fit, XS[:1], worse[:1]) is None
    assert effective_ratio({"error": "x"}, XS, worse) is None and effective_ratio(None, XS, worse) is None


# -- 5./6. a whole study ------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _files(run_dir: Path) -> dict:
    """Every file of a run directory: (mtime_ns, bytes)."""
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _one_thread_per_run():
    """The runner gives each run usable_cores() // jobs threads; 1 here, as the tests' tiny models use (two
    OpenMP threads on a shared 2-core box wait on each other).  Every run in these tests gets the same count,
    which is what bitwise comparisons need."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_runner, "usable_cores", lambda: 1)
        yield


def _main_quietly(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = study_main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def study_run(shakespeare_prefix, tmp_path_factory):
    """A 2-arm x 2-seed study run through the CLI, one run of which (ufp4 seed 2) was trained to step 2
    beforehand (as an interrupted study leaves it); and that run done uninterrupted in another study."""
    root = tmp_path_factory.mktemp("study")
    path = _write(root / "study.yaml", _spec(shakespeare_prefix, root / "out", pairs=[["ufp4", "bf16"]]))
    study = load_study(path)
    partial = next(r for r in study.runs() if r.key == "ufp4/seed_2")
    with _one_thread_per_run():
        threads = StudyRunner(study, jobs=2).threads
        assert threads == 1
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        # the interrupted run's first two steps, while the same run, uninterrupted, goes in another
        # study (only that arm and seed): the two are independent processes
        pre = subprocess.Popen([sys.executable, "-m", "megatron_ufp4.train", BASE, *partial.overrides,
                                "training.resume=auto", "--exit-after", "2"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        fresh_path = _write(root / "fresh.yaml", _spec(shakespeare_prefix, root / "fresh",
                                                       arms={"ufp4": {"recipe.name": "ufp4"}}, seeds=[2]))
        fresh_rc, fresh_log = _main_quietly([fresh_path, "--jobs", "1"])
        pre_err = pre.communicate()[1]
        assert pre.returncode == 0, pre_err[-2000:]
        before = {r.key: status(study, r) for r in study.runs()}
        rc, log = _main_quietly([path, "--jobs", "2"])  # two runs at a time, one thread each: the same bits
    fresh_study = load_study(fresh_path)
    return dict(path=path, study=study, partial=partial, before=before, rc=rc, log=log, fresh_rc=fresh_rc,
                fresh_log=fresh_log, fresh=fresh_study.runs()[0])


@pytest.mark.slow  # 6 training and 5 evaluation subprocesses (a torch import each): ~1 min on 2 cores
def test_study_end_to_end(study_run, capsys):
    study, rc = study_run["study"], study_run["rc"]
    assert rc == 0, study_run["log"][-3000:]
    out = study.out_dir
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    for png in ("loss_curves.png", "gaps.png"):  # matplotlib is installed
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    assert report["missing_runs"] == []
    ev, train = {}, {}
    for r in study.runs():
        e = json.loads((r.run_dir / EVAL_FILE).read_text())
        assert e["step"] == 4 and e["windows"] == EVAL_WINDOWS == e["requested_windows"]
        assert len(e["window_losses"]) == EVAL_WINDOWS
        # the mean of the per-window losses: fsum is exact before its one division; torch's float64 mean of n
        # positive terms is within (n - 1) u of the exact sum, plus its division: (n + 1) u relative
        assert e["loss"] == pytest.approx(math.fsum(e["window_losses"]) / EVAL_WINDOWS, rel=(EVAL_WINDOWS + 1) * U64)
        ev[r.arm, r.seed] = e
        train[r.arm, r.seed] = {rec["step"]: rec["loss"] for rec in _read_jsonl(r.run_dir / "metrics.jsonl")}
        assert sorted(train[r.arm, r.seed]) == [1, 2, 3, 4]
    res = report["points"]["None"]
    assert res["labels"] == {"bf16": ["fp32"], "ufp4": ["ufp4"]}
    for s in (1, 2):
        lb, lu = ev["bf16", s]["loss"], ev["ufp4", s]["loss"]
        assert res["final"]["ufp4"][str(s)]["loss"] == lu and res["final"]["bf16"][str(s)]["loss"] == lb
        # the gap from the files: the same three float64 operations (a subtraction, a product and a division,
        # each one rounding, in whatever order): within 3 u relative of ours
        gap = 100 * (lu - lb) / lb
        assert res["gap_pct"]["ufp4"]["per_seed"][str(s)] == pytest.approx(gap, rel=3 * U64)
        # its paired per-window standard error: sd of the window differences / sqrt(n), in float64; sums of n
        # terms each within n u, amplified by the cancellation in the centred sum of squares
        d = [a - b for a, b in zip(ev["ufp4", s]["window_losses"], ev["bf16", s]["window_losses"])]
        m = math.fsum(d) / len(d)
        centred = math.fsum((x - m) ** 2 for x in d)
        se = math.sqrt(centred / (len(d) - 1)) / math.sqrt(len(d))
        cancel = math.fsum(x * x for x in d) / centred
        assert res["gap_pct"]["ufp4"]["per_seed_eval_se"][str(s)] == pytest.approx(
            100 * se / lb, rel=8 * len(d) * U64 * cancel)
        # the paper's gap: the training loss over the last final_window (2) steps, from metrics.jsonl
        tw = {a: (train[a, s][3] + train[a, s][4]) / 2 for a in ("bf16", "ufp4")}
        assert res["train_window_loss"]["ufp4"][str(s)] == pytest.approx(tw["ufp4"], rel=2 * U64)
        assert res["train_gap_pct"]["ufp4"]["per_seed"][str(s)] == pytest.approx(
            100 * (tw["ufp4"] - tw["bf16"]) / tw["bf16"], rel=8 * U64 * (tw["ufp4"] / abs(tw["ufp4"] - tw["bf16"])))
        # ufp4 - bf16 of the gaps: the reference's own gap is 0, so this is ufp4's gap
        assert res["pairs"]["ufp4 - bf16"]["per_seed"][str(s)] == res["gap_pct"]["ufp4"]["per_seed"][str(s)]
        assert res["fingerprints"][str(s)] == {"init": "identical", "data_order": "identical"}
        assert f"{res['gap_pct']['ufp4']['per_seed'][str(s)]:+.3f}" in md
    gaps = [res["gap_pct"]["ufp4"]["per_seed"][s] for s in ("1", "2")]
    assert res["gap_pct"]["ufp4"]["mean"] == pytest.approx((gaps[0] + gaps[1]) / 2, rel=2 * U64)
    p = res["pairs"]["ufp4 - bf16"]
    assert p["positive"] + p["negative"] + p["zero"] == 2 and p["positive"] == sum(g > 0 for g in gaps)
    # the fingerprints carry information: the seeds' initial weights differ, the arms' of one seed do not
    infos = {(r.arm, r.seed): json.loads((r.run_dir / "run_info.json").read_text()) for r in study.runs()}
    assert infos["bf16", 1]["fingerprint"] == infos["ufp4", 1]["fingerprint"]
    assert infos["bf16", 1]["fingerprint"]["init"] != infos["bf16", 2]["fingerprint"]["init"]

    # a second call trains and evaluates nothing, and writes the same report
    files = {r.key: _files(r.run_dir) for r in study.runs()}
    logs = _files(out / "logs")
    with _one_thread_per_run():
        rc2, log2 = _main_quietly([study_run["path"], "--jobs", "1"])
    assert rc2 == 0 and "4 runs, 4 done, 0 to go" in log2 and "  train " not in log2
    assert {r.key: _files(r.run_dir) for r in study.runs()} == files  # metrics, checkpoints, evaluations
    assert _files(out / "logs") == logs
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "report.md").read_text() == md
    capsys.readouterr()
    assert study_main([study_run["path"], "--plan"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.split()[0] == "done" and "step 4/4" in line for line in lines)
    assert sorted(line.split()[1] for line in lines) == sorted(r.key for r in study.runs())


@pytest.mark.slow  # shares the study above; adds one run in another study
def test_resumed_run_equals_the_uninterrupted_run(study_run):
    partial, fresh = study_run["partial"], study_run["fresh"]
    before = study_run["before"]
    assert (before[partial.key].state, before[partial.key].step) == ("partial", 2)
    assert all(st.state == "new" and st.step == 0 for k, st in before.items() if k != partial.key)
    assert study_run["rc"] == 0 and study_run["fresh_rc"] == 0, study_run["fresh_log"][-3000:]
    assert f"train {partial.key} (resuming at step 2)" in study_run["log"]
    # the same run but for its directory
    assert [o for o in fresh.overrides if not o.startswith("training.run_dir=")] == \
        [o for o in partial.overrides if not o.startswith("training.run_dir=")]
    resumed = _read_jsonl(partial.run_dir / "metrics.jsonl")
    straight = _read_jsonl(fresh.run_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight):  # bit for bit (floats compared with ==)
        assert (a["loss"], a["grad_norm"], a["lr"], a.get("val_loss")) == \
            (b["loss"], b["grad_norm"], b["lr"], b.get("val_loss")), a["step"]
    ea, eb = (json.loads((r.run_dir / EVAL_FILE).read_text()) for r in (partial, fresh))
    assert ea["window_losses"] == eb["window_losses"] and ea["loss"] == eb["loss"]
