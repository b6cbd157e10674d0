"""The study runner: spec checks, the run grid, statistics by hand, and a whole study end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from megatron_ufp4.config import apply_override
from megatron_ufp4.study.__main__ import main as study_main
from megatron_ufp4.study.spec import StudyError, load_study, to_override
from megatron_ufp4.study.stats import effective_ratio, fit_power_law, paired_difference, power_law, summary

from conftest import CONFIGS, TINY_MODEL, TINY_RUN


def _overrides(prefix) -> dict:
    d = {}
    for o in [*TINY_MODEL, *TINY_RUN]:
        k, _, v = o.partition("=")
        d[k] = yaml.safe_load(v)
    d.update({"data.prefix": prefix, "training.train_steps": 4, "training.eval_interval": 2,
              "checkpoint.interval": 2, "schedule.warmup_steps": 1, "training.eval_windows": 4})
    return d


def _write(tmp_path, prefix, **changes) -> str:
    spec = {"name": "t", "base": str(CONFIGS / "tiny_dense.yaml"), "overrides": _overrides(prefix),
            "arms": {"bf16": {"recipe.name": "bf16"}, "ufp4": {"recipe.name": "ufp4"}},
            "seeds": [1, 2], "eval": {"windows": 6}, "final_window": 2, "out_dir": str(tmp_path / "out")}
    spec.update(changes)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # arms and points keep their order
    return str(path)


@pytest.mark.parametrize("change,message", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"arms": None}, "missing 'arms'"),
    ({"base": "nowhere.yaml"}, "base: config file not found"),
    ({"pairs": [["bf16", "nvfp4"]]}, "pairs: 'nvfp4' is not an arm"),
    ({"reference": "fp8"}, "reference: 'fp8' is not an arm"),
    ({"arms": {"x": {"recipe.name": "nonsense"}}}, "run x/seed_1: recipe: unknown recipe 'nonsense'"),
    ({"seeds": 0}, "seeds: expected a count"),
    ({"seeds": [1, 1]}, "seeds: repeated seed"),
    ({"final_window": 50}, "final_window: 50 is more than run"),
    ({"probes": {"arm": "nope", "recipes": ["ufp4"]}}, "probes.arm: 'nope' is not an arm"),
])
def test_spec_errors_are_one_line(tmp_path, shakespeare_prefix, capsys, change, message):
    path = _write(tmp_path, shakespeare_prefix, **change)
    with pytest.raises(StudyError, match=message.replace("[", r"\[")):
        load_study(path)
    assert study_main([path, "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and path in err[0]


@pytest.mark.parametrize("value", [[1, 2], ["fprop", "wgrad"], True, False, 3e-4, 0.5, "ufp4", None, {"a": 1}])
def test_to_override_round_trips(value):
    d: dict = {}
    apply_override(d, to_override("recipe.rht", value))
    assert d == {"recipe": {"rht": value}}


def test_run_grid(tmp_path, shakespeare_prefix):
    path = _write(tmp_path, shakespeare_prefix, sweep={"kind": "size", "points": {
        "s": {"model.hidden_size": 64}, "m": {"model.hidden_size": 96, "training.train_steps": 5}}})
    study = load_study(path)
    runs = study.runs()
    assert [r.key for r in runs] == [f"{p}/{a}/seed_{s}" for p in "sm" for a in ("bf16", "ufp4") for s in (1, 2)]
    for r in runs:
        assert r.run_dir == study.out_dir / "runs" / r.point / r.arm / f"seed_{r.seed}"
        assert r.overrides[-2:] == (f"training.seed={r.seed}", f"training.run_dir={r.run_dir}")
        cfg = study.run_config(r)
        assert cfg.training.train_steps == (5 if r.point == "m" else 4)  # the point overrides the study
        assert cfg.recipe["name"] == r.arm
    assert load_study(path, seeds=3).seeds == [1, 2, 3]


def test_statistics_by_hand():
    s = summary([1.0, 2.0, 3.0])
    t975 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # df = 2 has a closed form: t_p = (2p - 1) / sqrt(2p(1 - p))
    half = t975 / math.sqrt(3)  # t x sd (= 1) / sqrt(n)
    assert s["mean"] == 2.0 and s["sd"] == 1.0 and s["ci"] == pytest.approx([2 - half, 2 + half], rel=1e-12)
    assert summary([5.0]) == {"n": 1, "mean": 5.0, "median": 5.0, "sd": None, "ci": None}
    assert summary([4.0, 1.0, 3.0, 100.0])["median"] == 3.5
    d = paired_difference({1: 1.0, 2: 0.5, 3: 2.0}, {1: 0.5, 2: 1.0, 4: 9.0})
    assert d["per_seed"] == {1: 0.5, 2: -0.5} and (d["positive"], d["negative"], d["zero"]) == (1, 1, 0)
    assert d["mean"] == 0.0 and d["n"] == 2


def test_power_law_fit_and_effective_ratio():
    xs = [1e5, 3e5, 1e6, 3e6, 1e7]
    ys = [power_law(x, 3.0, 0.4, 1.5) for x in xs]
    fit = fit_power_law(xs, ys)
    # exact data: least squares reaches the true parameters up to the solver's tolerance (1e-8
    # relative in the residual), far inside 1e-5 for parameters this well determined
    assert fit["A"] == pytest.approx(3.0, rel=1e-5) and fit["alpha"] == pytest.approx(0.4, rel=1e-5)
    assert fit["E"] == pytest.approx(1.5, rel=1e-5)
    assert fit_power_law(xs[:2], ys[:2]) is None
    worse = [power_law(0.7 * x, 3.0, 0.4, 1.5) for x in xs[:3]]
    r = effective_ratio(fit, xs[:3], worse)
    assert r["ratio"] == pytest.approx(0.7, rel=1e-4)  # through the fitted (not exact) A, alpha, E


def _train_cmd(study, run, *extra):
    return [sys.executable, "-m", "megatron_ufp4.train", str(study.base), *run.overrides, "training.resume=auto",
            *extra]


@pytest.mark.slow  # 8-10 subprocesses (torch import each): ~1 min on 2 cores
def test_study_end_to_end_with_resume(tmp_path, shakespeare_prefix, capsys):
    path = _write(tmp_path, shakespeare_prefix, jobs=2, pairs=[["ufp4", "bf16"]])
    study = load_study(path)
    partial = next(r for r in study.runs() if r.key == "ufp4/seed_2")
    # one run trained to step 2 beforehand, as an interrupted study leaves it
    subprocess.run(_train_cmd(study, partial, "--exit-after", "2"), check=True, capture_output=True)
    from megatron_ufp4.study.runner import status
    assert status(study, partial).state == "partial"
    assert study_main([path]) == 0
    out = study.out_dir
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and (out / "loss_curves.png").stat().st_size > 0
    evals = {}
    for r in study.runs():
        ev = json.loads((r.run_dir / "study_eval.json").read_text())
        assert ev["windows"] == 6 and ev["step"] == 4
        assert ev["loss"] == pytest.approx(math.fsum(ev["window_losses"]) / 6, rel=1e-15)
        evals[r.arm, r.seed] = ev["loss"]
    res = report["points"]["None"]
    for s in (1, 2):
        want = 100 * (evals["ufp4", s] - evals["bf16", s]) / evals["bf16", s]
        assert res["gap_pct"]["ufp4"]["per_seed"][str(s)] == pytest.approx(want, rel=1e-12)
        assert res["fingerprints"][str(s)] == {"init": "identical", "data_order": "identical"}
    assert res["pairs"]["ufp4 - bf16"]["per_seed"]["1"] == pytest.approx(res["gap_pct"]["ufp4"]["per_seed"]["1"])
    assert res["labels"] == {"bf16": ["fp32"], "ufp4": ["ufp4"]}
    # the resumed run equals the same run done in one go, bit for bit
    fresh = tmp_path / "fresh"
    subprocess.run([*_train_cmd(study, partial)[:-1], f"training.run_dir={fresh}"], check=True, capture_output=True)
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (partial.run_dir, fresh)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    # a second call trains nothing and writes the same numbers
    mtimes = {r.key: (r.run_dir / "metrics.jsonl").stat().st_mtime_ns for r in study.runs()}
    capsys.readouterr()
    assert study_main([path]) == 0
    assert "4 runs, 4 done, 0 to go" in capsys.readouterr().out
    assert mtimes == {r.key: (r.run_dir / "metrics.jsonl").stat().st_mtime_ns for r in study.runs()}
    assert json.loads((out / "report.json").read_text())["points"] == report["points"]
