"""Every command, driven with bad input: exit status 2, one stderr line naming what is wrong,
and the file tree exactly as it was (nothing overwritten, nothing left behind).

Each case builds its inputs in a fresh directory (or reads the session's trained run and
prepared dataset), snapshots every file under the directories it names (path, size, bytes),
runs the command's ``main`` in this process and compares.  The commands' own tests cover
their success paths; this table covers the promise they share (megatron_ufp4/outputs.py,
config.py's merge and YAML rules, the study's checks).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import CONFIGS, REPO_ROOT, SHAKESPEARE_SAMPLE, one_thread


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO_ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _cli(module: str) -> Callable:
    return lambda argv: importlib.import_module(module).main(argv)


def tree(*roots: Path) -> dict:
    """Every file (and directory) under ``roots``: path -> (size, sha256); directories -> None."""
    out = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = (root.stat().st_size, hashlib.sha256(root.read_bytes()).hexdigest())
            continue
        for p in sorted(root.rglob("*")) if root.exists() else []:
            out[str(p)] = None if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@dataclass
class Case:
    main: Callable
    argv: list[str]
    line: str  # a regex the one stderr line must contain
    watch: list[Path] = field(default_factory=list)  # directories whose trees must not change


@pytest.fixture(scope="module")
def ctx(trained_run, shakespeare_prefix, tmp_path_factory):
    run_dir, overrides = trained_run
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    return {"run": run_dir, "ckpt": ckpt, "overrides": overrides, "prefix": shakespeare_prefix}


def _study(tmp: Path, extra: str = "", arms: str = "  ufp4: {recipe.name: ufp4}\n", ctx=None) -> Path:
    over = "{" + ", ".join(o.replace("=", ": ", 1) for o in ctx["overrides"]
                           if not o.startswith("training.run_dir")) + "}"
    path = tmp / "study.yaml"
    path.write_text(f"base: {CONFIGS / 'tiny_dense.yaml'}\noverrides: {over}\narms:\n{arms}seeds: [1]\n"
                    f"final_window: 1\nout_dir: {tmp / 'out'}\n{extra}", encoding="utf-8")
    return path


def _fake_finished_run(tmp: Path, ctx, recipe: str) -> None:
    """A study run directory whose final checkpoint was trained with ``recipe``."""
    from megatron_ufp4.config import dump_config, load_config

    cfg = load_config(CONFIGS / "tiny_dense.yaml", [*ctx["overrides"], f"recipe.name={recipe}", "training.seed=1"])
    step = tmp / "out" / "runs" / "ufp4" / "seed_1" / "checkpoints" / f"step_{cfg.training.train_steps:08d}"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")  # what marks a (sharded) checkpoint directory as complete
    (step / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")


def _cases(tmp: Path, ctx) -> dict[str, Callable[[], Case]]:
    run, ckpt, prefix = ctx["run"], ctx["ckpt"], ctx["prefix"]
    data_dir = Path(prefix).parent
    ev, prep, study, train = (_cli("megatron_ufp4.eval"), _cli("megatron_ufp4.data.prepare"),
                              _cli("megatron_ufp4.study.__main__"), _cli("megatron_ufp4.train"))

    def existing(name: str, text: str = "keep me\n") -> Path:
        p = tmp / name
        p.write_text(text)
        return p

    def single_file_step(src: Path) -> Path:
        """``tmp/single/step_*/state.pt``: ``src`` exported as one file (made once)."""
        step = tmp / "single" / src.name
        if not (step / "state.pt").is_file():
            step.mkdir(parents=True)
            assert _tool("convert_checkpoint")(["to-single", str(src), str(step / "state.pt")]) == 0
        return step

    def bad_yaml(text: str | bytes) -> Path:
        p = tmp / "bad.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    return {
        # -- outputs never clobber inputs or other outputs
        "eval --json onto the checkpoint it reads": lambda: Case(
            ev, [str(run), "--json", str(ckpt / "__0_0.distcp"), "--overwrite"], r"is \(or is inside\) an input",
            [run]),
        "eval --json onto an existing file": lambda: Case(
            ev, [str(ckpt), "--json", str(existing("result.json"))], r"already exists; pass --overwrite", [tmp, run]),
        "prepare onto an existing dataset": lambda: Case(
            prep, ["--input", str(SHAKESPEARE_SAMPLE), "--output", prefix, "--vocab-size", "400", "--split-paragraphs"],
            r"already exists \(a prepared dataset\); pass --overwrite", [data_dir]),
        "a failing re-prepare keeps the old dataset": lambda: Case(
            prep, ["--input", str(SHAKESPEARE_SAMPLE), "--output", prefix, "--vocab-size", "261", "--overwrite",
                   "--split-paragraphs"],
            r"sentencepiece training failed", [data_dir]),
        "convert to-single onto an existing file": lambda: Case(
            _tool("convert_checkpoint"), ["to-single", str(ckpt), str(existing("model.pt"))],
            r"already exists; pass --overwrite", [tmp, run]),
        "convert to-dcp onto an existing checkpoint": lambda: Case(  # a step_* dir holding one file, into itself
            _tool("convert_checkpoint"), ["to-dcp", str(single_file_step(ckpt) / "state.pt"),
                                          str(single_file_step(ckpt))],
            r"is \(or contains\) an input", [tmp, run]),
        "plot onto an existing figure": lambda: Case(
            _tool("plot_metrics"), [str(run), "--out", str(existing("loss.png"))], r"already exists", [tmp, run]),
        # -- a refused training start creates nothing
        "train with a missing init_from": lambda: Case(
            train, [str(CONFIGS / "tiny_dense.yaml"), *ctx["overrides"][:-1], f"training.run_dir={tmp / 'new_run'}",
                    f"training.init_from={tmp / 'missing.pt'}"], r"training.init_from .*no such checkpoint", [tmp]),
        "train on data that is not there": lambda: Case(
            train, [str(CONFIGS / "tiny_dense.yaml"), *ctx["overrides"], f"training.run_dir={tmp / 'new_run'}",
                    f"data.prefix={tmp / 'nodata'}"], r"nodata", [tmp]),
        # -- wrong input is refused, not accepted
        "a config with a repeated key": lambda: Case(
            train, [str(bad_yaml("model:\n  hidden_size: 8\nmodel:\n  hidden_size: 16\n"))],
            r"repeated key 'model' \(line 3\)", [tmp]),
        "a config that is not UTF-8": lambda: Case(
            train, [str(bad_yaml(b"model: {hidden_size: 8}\n# \xff\xfe\n"))], r"not UTF-8", [tmp]),
        "an override with a repeated key": lambda: Case(
            train, [str(CONFIGS / "tiny_dense.yaml"), "training={seed: 1, seed: 2}"], r"repeated key 'seed'", [tmp]),
        "plan_parallel with a negative world": lambda: Case(
            _tool("plan_parallel"), [str(CONFIGS / "tiny_dense.yaml"), "--world", "-4"], r"--world must be >= 1",
            [tmp]),
        "plan_parallel with world 0": lambda: Case(
            _tool("plan_parallel"), [str(CONFIGS / "tiny_dense.yaml"), "--world", "0"], r"--world must be >= 1", [tmp]),
        "import_hf of a config.json that is a list": lambda: Case(
            _tool("import_hf"), [str(_hf_dir(tmp)), str(tmp / "imported")], r"expected a JSON object", [tmp]),
        "export_hf onto a non-empty directory": lambda: Case(
            _tool("export_hf"), [str(ckpt), str(existing("notes.txt").parent), "--no-tokenizer"],
            r"exists and is not an empty directory", [tmp, run]),
        "eval on data of another tokenizer": lambda: Case(
            ev, [str(ckpt), "--data-prefix", _other_tokenizer(tmp)],
            r"--data-prefix .* has another tokenizer \(sha256 \w+\) than run .* trained with", [tmp, run]),
        "eval of a checkpoint that is not there": lambda: Case(ev, [str(tmp / "nothing")], r"nothing", [tmp]),
        "sample with a tokenizer that is not there": lambda: Case(
            _cli("megatron_ufp4.sample"), [str(ckpt), "--tokenizer", str(tmp / "missing.model")], r"missing.model",
            [tmp, run]),
        "plot --out and --heatmap the same file": lambda: Case(
            _tool("plot_metrics"), [str(run), "--out", str(tmp / "a.png"), "--heatmap", str(tmp / "a.png")],
            r"same file", [tmp, run]),
        "convert a src that is not a checkpoint": lambda: Case(
            _tool("convert_checkpoint"), ["to-single", str(_hf_dir(tmp)), str(tmp / "out.pt")],
            r"not a DCP checkpoint", [tmp]),
        "train with a misspelled section": lambda: Case(
            train, [str(CONFIGS / "tiny_dense.yaml"), "trianing.seed=1"], r"trianing", [tmp]),
        # -- studies
        "study: a repeated seed": lambda: Case(study, [str(_study(tmp, ctx=ctx)), "--seeds", "1,1"],
                                               r"repeated seed", [tmp]),
        "study: an arm sets training.seed in nested YAML": lambda: Case(
            study, [str(_study(tmp, arms="  a: {training: {seed: 7}}\n", ctx=ctx))],
            r"arms.a: training.seed is set by the study", [tmp]),
        "study: a sweep point sets training.run_dir": lambda: Case(
            study, [str(_study(tmp, "sweep: {points: {s: {training.run_dir: x}, m: {model.hidden_size: 32}}}\n",
                               ctx=ctx))], r"sweep.points.s: training.run_dir is set by the study", [tmp]),
        "study: repeated arms": lambda: Case(
            study, [str(_study(tmp, arms="  a: {recipe.name: ufp4}\n  a: {recipe.name: bf16}\n", ctx=ctx))],
            r"repeated key 'a'", [tmp]),
        "study: a launcher that is not torchrun": lambda: Case(
            study, [str(_study(tmp, "launcher: [bash, -c, 'echo ran > launched.txt']\n", ctx=ctx))],
            r"must start with torchrun", [tmp]),
        "study: a torchrun option that runs another program": lambda: Case(
            study, [str(_study(tmp, "launcher: [torchrun, --no-python]\n", ctx=ctx))], r"'--no-python' is not allowed",
            [tmp]),
        "study: a mistyped eval.backend": lambda: Case(
            study, [str(_study(tmp, "eval: {backend: fuzed}\n", ctx=ctx))], r"eval.backend: unknown backend 'fuzed'",
            [tmp]),
        "study: out_dir is a file": lambda: Case(
            study, [str(_study(tmp, ctx=ctx)), "--out", str(existing("out_file"))], r"exists and is not a directory",
            [tmp]),
        "study: not UTF-8": lambda: Case(study, [str(bad_yaml(b"name: \xff\n"))], r"not UTF-8", [tmp]),
        "study: a finished run trained with another recipe": lambda: (
            _fake_finished_run(tmp, ctx, "e2m1_ref"),
            Case(study, [str(_study(tmp, ctx=ctx))], r"trained with another config .*recipe.name: checkpoint has "
                 r"'e2m1_ref', config has 'ufp4'.*--rerun-stale", [tmp]))[1],
    }


def _other_tokenizer(tmp: Path) -> str:
    """The sample prepared again with a smaller vocabulary: same text, other token ids."""
    from megatron_ufp4.data import prepare

    prefix = str(tmp / "other" / "shk")
    prepare.prepare(prepare.parse_args(["--input", str(SHAKESPEARE_SAMPLE), "--output", prefix, "--vocab-size", "400",
                                        "--split-paragraphs", "--val-fraction", "0.1"]))
    return prefix


def test_resume_on_data_of_another_tokenizer_is_refused(trained_run, tmp_path, capsys):
    """The run resumes from its step-2 checkpoint in a copy of its directory, on a dataset
    prepared again with another vocabulary: one line, nothing changed."""
    from megatron_ufp4 import train

    run_dir, overrides = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    other = _other_tokenizer(tmp_path)
    before = tree(copy)
    with one_thread():
        rc = train.main([str(CONFIGS / "tiny_dense.yaml"), *overrides, f"training.run_dir={copy}",
                         f"data.prefix={other}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "has another tokenizer" in err[0], err
    assert tree(copy) == before


def _hf_dir(tmp: Path) -> Path:
    d = tmp / "hf"
    d.mkdir()
    (d / "config.json").write_text("[1, 2]")
    return d


CASES = list(_cases(Path("."), {"run": Path("."), "ckpt": Path("."), "overrides": [], "prefix": "."}))


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_changes_nothing(name, ctx, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case = _cases(tmp_path, ctx)[name]()
    before = tree(*case.watch)
    capsys.readouterr()
    with one_thread():
        try:
            rc = case.main(case.argv)
        except SystemExit as e:  # argparse
            rc = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("warning")]
    assert rc == 2, (name, rc, err)
    assert len(err) == 1, (name, err)
    assert re.search(case.line, err[0]), (name, err[0])
    assert tree(*case.watch) == before, name


def test_a_nested_override_merges_into_its_section(tmp_path):
    from megatron_ufp4.config import load_config

    cfg = load_config(CONFIGS / "tiny_dense.yaml", ["training={seed: 7}"])
    base = load_config(CONFIGS / "tiny_dense.yaml")
    assert cfg.training.seed == 7 and cfg.training.train_steps == base.training.train_steps


def test_a_failed_prepare_leaves_nothing(tmp_path):
    from megatron_ufp4.data import prepare

    before = tree(tmp_path)
    with pytest.raises(prepare.DataError):
        prepare.prepare(prepare.parse_args(["--input", str(SHAKESPEARE_SAMPLE), "--output", str(tmp_path / "x"),
                                            "--vocab-size", "261", "--split-paragraphs"]))
    assert tree(tmp_path) == before  # no .model / .vocab / temporary directory


def test_the_study_lock_names_the_holder(tmp_path, ctx):
    from megatron_ufp4.training.run_dir import RunDirLock

    out = tmp_path / "out"
    out.mkdir()
    held = RunDirLock(out, field="out_dir", what="study").acquire()
    try:  # this process holds it: a second acquire in-process is counted, so ask from a child
        path = _study(tmp_path, ctx=ctx)
        proc = subprocess.run([sys.executable, "-m", "megatron_ufp4.study", str(path)], capture_output=True,
                              text=True, cwd=REPO_ROOT, timeout=120)
    finally:
        held.release()
    assert proc.returncode == 2 and "is in use by another study (PID" in proc.stderr, proc.stderr


def test_outputs_refuse_and_write_atomically(tmp_path):
    from megatron_ufp4.outputs import OutputError, Outputs, atomic_file, check_output

    f = tmp_path / "a.json"
    f.write_text("old")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        check_output(f, flag="--force")
    assert check_output(f, overwrite=True) == f
    with pytest.raises(OutputError, match="is \\(or is inside\\) an input"):
        check_output(tmp_path / "ckpt" / "state.pt", overwrite=True, units=[tmp_path / "ckpt"])
    with pytest.raises(OutputError, match="is \\(or contains\\) an input"):
        check_output(tmp_path, overwrite=True, inputs=[tmp_path / "ckpt"])
    assert check_output(tmp_path / "new.png", inputs=[tmp_path]) == tmp_path / "new.png"  # a new file beside inputs
    with pytest.raises(RuntimeError), atomic_file(f) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(KeyboardInterrupt), Outputs(tmp_path) as out:
        out.path(tmp_path / "b.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with Outputs(tmp_path) as out:
        out.path(tmp_path / "b.bin").write_bytes(b"x")
        out.path(f).write_text("new")
        out.commit()
    assert f.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_fused_without_a_compiler_is_one_line_before_the_run_dir(tmp_path, ctx, capsys):
    from torch._inductor import config as inductor_config
    from torch._inductor import cpp_builder

    from megatron_ufp4 import train

    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}), one_thread():
            rc = train.main([str(CONFIGS / "tiny_dense.yaml"), *ctx["overrides"], "gemm.backend=fused",
                             f"training.run_dir={tmp_path / 'run'}"])
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "found no working C++ compiler" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_damaged_evaluation_is_not_a_traceback_and_not_done(tmp_path, ctx, capsys):
    from megatron_ufp4.study.__main__ import main

    _fake_finished_run(tmp_path, ctx, "ufp4")
    run_dir = tmp_path / "out" / "runs" / "ufp4" / "seed_1"
    for damaged in ("[1, 2]", "{not json", '{"loss": "x"}'):
        (run_dir / "study_eval.json").write_text(damaged)
        assert main([str(_study(tmp_path, ctx=ctx)), "--plan"]) == 0
        assert capsys.readouterr().out.startswith("partial "), damaged  # trained, to be evaluated again


def test_stopping_a_study_stops_its_children(tmp_path):
    """SIGTERM / Ctrl-C to the study reaches the running training processes (they save and exit)."""
    import threading
    import time

    from megatron_ufp4.study.runner import StudyRunner

    class Spec:
        launcher, jobs, out_dir = [], 1, tmp_path

    runner = StudyRunner(Spec())
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", runner._call(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log")))
    t.start()
    for _ in range(100):
        if runner._children:
            break
        time.sleep(0.05)
    start = time.monotonic()
    runner.stop()
    t.join(timeout=30)
    assert result.get("rc") == -15 and time.monotonic() - start < 10  # SIGTERM, not the 60 s sleep
    assert runner._call([sys.executable, "-c", "pass"], tmp_path / "log") == -15  # nothing new starts
