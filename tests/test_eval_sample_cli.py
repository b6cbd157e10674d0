"""The eval and sample CLIs on a saved checkpoint: eval prints the trainer's validation loss,
sample prints text, and every failure is one line naming the checkpoint or the flag."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

try:  # tests/ as a package (with __init__.py) or as a plain directory on sys.path
    from .conftest import REPO_ROOT, quiet, read_metrics
except ImportError:
    from conftest import REPO_ROOT, quiet, read_metrics
from megatron_ufp4.training.evaluation import eval_window_count, summarize, window_losses
from megatron_ufp4.training.inference import generate, load_trained_model
from megatron_ufp4.training.run_setup import validation_dataset
from megatron_ufp4.training.trainer import Trainer

pytestmark = [pytest.mark.numerical, pytest.mark.usefixtures("single_thread")]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONIOENCODING"] = "utf-8"
    return env


SAMPLE_ARGS = ["--prompt", "ROMEO:", "--max-new-tokens", "24", "--seed", "3", "--temperature", "0.8", "--top-k", "20"]


@pytest.fixture(scope="module")
def cli_runs(trained_run, tmp_path_factory):
    """The eval and sample CLIs in real processes, started together (each pays the torch import).
    Output is read as bytes: sampled text may hold a lone \r that text mode would turn into \n."""
    run_dir, _ = trained_run
    missing = tmp_path_factory.mktemp("empty") / "no_such_run"
    cases = {
        "eval": ["megatron_ufp4.eval", str(run_dir)],
        "sample": ["megatron_ufp4.sample", str(run_dir / "checkpoints" / "step_00000002"), *SAMPLE_ARGS],
        # one error through a real process (no traceback, nothing on stdout at exit); every CLI's
        # errors, this one included, are also checked in process (test_eval_sample_cli_errors)
        "eval_missing": ["megatron_ufp4.eval", str(missing)],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path_factory.mktemp("cwd"), env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, args in cases.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[k] = (p.returncode, out.decode("utf-8"), err.decode("utf-8", "replace"))
    return results


@pytest.mark.slow  # with cli_runs: three interpreters (torch import each), ~6-15 s on 2 cores
def test_eval_cli_matches_trainer_evaluate(cli_runs, trained_run, tiny_cfg, tmp_path):
    run_dir, _ = trained_run
    rc, out, err = cli_runs["eval"]
    assert rc == 0, err
    # the reference: a Trainer resumed from (a copy of) the same checkpoint
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    cfg = tiny_cfg("tiny_dense", tmp_path, "recipe.name=ufp4", "training.train_steps=4", "checkpoint.interval=0")
    trainer = Trainer(cfg, console=quiet)
    assert trainer.step == 2
    want = trainer.evaluate()["loss"]
    assert f"step 2: validation loss {want:.4f} ± " in out, out  # the CLI prints 4 decimals
    printed = float(out.split("validation loss ")[1].split(" ")[0])
    assert abs(printed - want) <= 5e-5 + 1e-9
    # the CLI's own computation path, to full precision
    model, ckpt_cfg, step = load_trained_model(run_dir)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)
    ds = validation_dataset(ckpt_cfg)
    got = summarize(window_losses(model, ds, eval_window_count(ckpt_cfg, len(ds)),
                                  ckpt_cfg.training.micro_batch_size, autocast))["loss"]
    assert step == 2 and abs(got - want) < 1e-5
    # and the validation loss the training run itself logged at step 2
    logged = [r for r in read_metrics(run_dir) if r["step"] == 2][0]["val_loss"]
    assert abs(logged - want) < 1e-5


@pytest.mark.slow
def test_sample_cli_prints_text(cli_runs, trained_run):
    from megatron_ufp4.data.tokenizer import Tokenizer

    run_dir, _ = trained_run
    rc, out, err = cli_runs["sample"]
    assert rc == 0, err
    assert out.startswith("ROMEO:") and len(out.rstrip("\n")) > len("ROMEO:")
    # the reference: the same seeded sampling in process
    model, cfg, _ = load_trained_model(run_dir / "checkpoints" / "step_00000002")
    tok = Tokenizer(cfg.data.prefix + ".model")
    ids = generate(model, tok.encode("ROMEO:"), 24, cfg.model.max_seq_len, 0.8, 20,
                   torch.Generator().manual_seed(3), tok.eos_id)
    assert len(ids) >= 1
    assert out == "ROMEO:" + tok.decode(ids) + "\n"


@pytest.mark.slow
def test_eval_cli_missing_checkpoint_in_a_real_process(cli_runs):
    rc, out, err = cli_runs["eval_missing"]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "no checkpoint" in lines[0] and "no_such_run" in lines[0], lines[0]
    assert out == ""


@pytest.mark.parametrize("cli", ["eval", "sample"])
@pytest.mark.parametrize("what, needle", [("missing", "no checkpoint"), ("empty_dir", "no checkpoint"),
                                          ("corrupt", "cannot read checkpoint"),
                                          ("corrupt_sharded", "cannot read")])
def test_eval_sample_cli_errors(cli, what, needle, tmp_path, capsys):
    """Exit 2 and one ``error:`` line (in process: an escaping exception would fail the test)."""
    import importlib

    main = importlib.import_module(f"megatron_ufp4.{cli}").main
    target = tmp_path / "run"
    if what != "missing":
        target.mkdir()
    if what == "corrupt":
        (target / "state.pt").write_bytes(b"garbage")
    if what == "corrupt_sharded":  # a sharded checkpoint whose metadata is garbage
        (target / ".metadata").write_bytes(b"garbage")
        (target / "partitions.json").write_text("{}")
    assert main([str(target)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err
    if what == "corrupt_sharded":
        assert str(target / ".metadata") in lines[0], lines[0]
    assert captured.out == ""
