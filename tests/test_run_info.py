"""run_info.json fingerprints and labels (training/run_info.py), ``Recipe.label``,
``configure_threads`` and the eval CLI (eval.py), against hand-computed values and
float64 references (the window-loss bound is derived in tests/test_evaluation.py)."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_state_equal, one_thread, quiet, read_metrics, snapshot

from megatron_ufp4 import eval as eval_cli
from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.training.evaluation import summarize, window_losses
from megatron_ufp4.training.inference import load_trained_model
from megatron_ufp4.training.run_info import RUN_INFO, precision_label, read_run_info
from megatron_ufp4.training.run_setup import configure_threads, usable_cores, validation_dataset
from megatron_ufp4.training.trainer import Trainer

U32 = 2.0 ** -24
U64 = 2.0 ** -53
FAST = ["logging.peak_tflops=1"]  # no start-up matmul benchmark (MFU denominator only)
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)



# -- run_info.json: fingerprints and labels ---------------------------------------------------------
TWO_STEPS = ["training.train_steps=2", "training.eval_interval=2", "checkpoint.interval=0", "schedule.warmup_steps=1",
             *FAST]


@pytest.fixture(scope="module")
def runs(tiny_cfg, tmp_path_factory):
    """name -> dict(run_dir, info, records, model (final state), init (initial state) of a trained run."""
    specs = {  # name: (overrides, train?)
        "ufp4_sr1": (["recipe.name=ufp4", "training.sr_seed=1"], True),
        "ufp4_sr1_again": (["recipe.name=ufp4", "training.sr_seed=1"], True),
        "ufp4_sr2": (["recipe.name=ufp4", "training.sr_seed=2"], True),
        "bf16_sr1": (["recipe.name=bf16", "training.sr_seed=1"], False),
        "ufp4_seed1": (["recipe.name=ufp4", "training.seed=1", "training.sr_seed=1"], False),
        "bf16_bf16": (["recipe.name=bf16", "training.dtype=bf16"], False),
    }
    out = {}
    with one_thread():
        for name, (extra, train) in specs.items():
            run_dir = tmp_path_factory.mktemp(name)
            trainer = Trainer(tiny_cfg("tiny_dense", run_dir, *TWO_STEPS, *extra), console=quiet)
            init = snapshot(dict(trainer.model.named_parameters()))
            info = read_run_info(run_dir)
            records = None
            if train:
                trainer.train()
                records = read_metrics(run_dir)
            out[name] = dict(run_dir=run_dir, info=info, init=init, records=records,
                             model=snapshot(trainer.model.state_dict()), trainer=trainer)
            trainer.close()
    return out


def sha256_of_params(params: dict) -> str:
    """The fingerprint as run_info.py specifies it: (name, shape, FP32 bytes) in name order."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().float().contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_run_info_written(runs):
    r = runs["ufp4_sr1"]
    assert (r["run_dir"] / RUN_INFO).is_file()
    info = json.loads((r["run_dir"] / RUN_INFO).read_text())
    assert info == r["info"]
    assert info["label"] == "ufp4" and info["recipe"] == "ufp4" and info["backend"] == "emulated"
    seed = r["trainer"].cfg.training.seed
    assert seed != 1 and info["seed"] == seed and info["sr_seed"] == 1 and info["dtype"] == "fp32"
    fp = info["fingerprint"]
    assert set(fp) == {"init", "data_order", "tokenizer"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", fp[k]) for k in fp)
    # tokenizer: the SHA-256 of the dataset's tokenizer model file, byte for byte
    model = Path(r["trainer"].cfg.data.prefix + ".model").read_bytes()
    assert fp["tokenizer"] == hashlib.sha256(model).hexdigest()
    # init is the hash of the initial weights (not of the trained ones)
    assert fp["init"] == sha256_of_params(r["init"])
    assert fp["init"] != sha256_of_params({k: v for k, v in r["trainer"].model.named_parameters()})
    # sr_seed null is recorded as the seed it falls back to
    assert runs["bf16_bf16"]["info"]["sr_seed"] == runs["bf16_bf16"]["info"]["seed"] == seed


def test_fingerprints_depend_on_seed_only(runs):
    fp = {name: r["info"]["fingerprint"] for name, r in runs.items()}
    base = fp["ufp4_sr1"]
    for same in ("bf16_sr1", "ufp4_sr2", "ufp4_sr1_again", "bf16_bf16"):  # other recipe, sr_seed or dtype
        assert fp[same] == base, same
    other = fp["ufp4_seed1"]  # training.seed=1: other initial weights and another sample order
    assert other["init"] != base["init"]
    assert other["data_order"] != base["data_order"]
    # the recorded hashes are of what the runs started from
    assert_state_equal(runs["bf16_sr1"]["init"], runs["ufp4_sr2"]["init"])
    assert not torch.equal(runs["ufp4_seed1"]["init"]["embed.weight"], runs["ufp4_sr1"]["init"]["embed.weight"])


def test_precision_labels(runs):
    assert runs["bf16_sr1"]["info"]["label"] == "fp32"  # the bf16 recipe's GEMMs run in FP32 under dtype=fp32
    assert runs["bf16_bf16"]["info"]["label"] == "bf16"
    assert runs["ufp4_seed1"]["info"]["label"] == "ufp4"
    bf16 = Recipe.preset("bf16")
    assert precision_label(bf16, "fp32") == "fp32"
    assert precision_label(bf16, "bf16") == "bf16"
    assert precision_label(Recipe.preset("ufp4"), "bf16") == "ufp4"
    assert precision_label(Recipe.from_dict({"name": "ufp4", "format": "e2m1"}), "fp32") == "ufp4[format=e2m1]"
    # a recipe that quantizes nothing is high precision whatever its name
    assert precision_label(Recipe.from_dict({"name": "ufp4", "format": None}), "fp32") == "fp32"


def test_sr_seed_changes_stochastic_rounding_only(runs):
    a, again, b = (runs[k]["records"] for k in ("ufp4_sr1", "ufp4_sr1_again", "ufp4_sr2"))
    assert [r["step"] for r in a] == [1, 2]
    keys = ("loss", "grad_norm", "val_loss", "val_loss_se", "val_windows")
    # the same sr_seed reproduces the run bitwise
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in again]
    assert_state_equal(runs["ufp4_sr1"]["model"], runs["ufp4_sr1_again"]["model"])
    # another sr_seed: the same first forward (RTNE forward, same weights and data) ...
    assert a[0]["loss"] == b[0]["loss"]
    # ... but other SR draws of dY: other gradients, so another step-2 loss
    assert a[0]["grad_norm"] != b[0]["grad_norm"]
    assert a[1]["loss"] != b[1]["loss"]


def test_trainer_logs_window_summary(runs):
    """The step-2 record's val_loss / val_loss_se / val_windows are the summary of the final model's
    8 windows (eval_iters 2 x micro_batch_size 4)."""
    r = runs["ufp4_sr1"]
    last = r["records"][-1]
    trainer = r["trainer"]
    with one_thread():
        res = summarize(window_losses(trainer.model, trainer.val_ds, 8, 4, NO_AUTOCAST))
    assert last["val_windows"] == 8
    assert last["val_loss"] == res["loss"] and last["val_loss_se"] == res["se"]
    assert last["val_ppl"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)


# -- Recipe.label -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bf16", "ufp4", "e2m1_ref", "nvfp4", "mxfp4"])
def test_preset_labels_are_their_names(name):
    assert Recipe.preset(name).label() == name
    assert Recipe.from_dict({"name": name}).label() == name
    assert Recipe.from_dict(name).label() == name


def test_overridden_recipe_labels():
    assert Recipe.from_dict({"name": "ufp4", "format": "e2m1"}).label() == "ufp4[format=e2m1]"
    assert Recipe.from_dict({"name": "ufp4", "sr": []}).label() == "ufp4[sr=none]"
    # no-op overrides: the same recipe as the preset, so its label
    assert Recipe.from_dict({"name": "ufp4", "rht": ["wgrad", "fprop", "dgrad"]}).label() == "ufp4"
    assert Recipe.from_dict({"name": "ufp4", "rht": True}).label() == "ufp4"
    assert Recipe.from_dict({"name": "ufp4", "format": "int4", "sr": ["dy"]}).label() == "ufp4"
    # nested overrides give dotted keys
    assert Recipe.from_dict({"name": "ufp4", "w": {"block_2d": True}}).label() == "ufp4[w.block_2d=True]"
    assert Recipe.from_dict({"name": "ufp4", "fprop": {"rht": False}}).label() == "ufp4[fprop.rht=False]"
    assert (Recipe.from_dict({"name": "ufp4", "dgrad": {"dy": {"rounding": "rtne"}}}).label()
            == "ufp4[dgrad.dy.rounding=rtne]")
    # several overrides, each once
    lab = Recipe.from_dict({"name": "e2m1_ref", "rht": ["fprop", "wgrad"], "sr": []}).label()
    assert lab.startswith("e2m1_ref[") and lab.endswith("]")
    assert sorted(lab[len("e2m1_ref["):-1].split("; ")) == ["rht=fprop,wgrad", "sr=none"]
    # a preset's nested key changed (nvfp4 has w.block_2d=True)
    assert Recipe.from_dict({"name": "nvfp4", "w": {"block_2d": False}}).label() == "nvfp4[w.block_2d=False]"
    # no preset to start from
    assert Recipe.from_dict({"format": "e2m1"}).label() == "custom[format=e2m1]"
    # an overridden recipe is never labelled as the preset itself
    assert Recipe.from_dict({"name": "ufp4", "rht_size": 32}).label() == "ufp4[rht_size=32]"


# -- configure_threads ------------------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_threads_explicit(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit count wins over the environment
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for n in (1, 2, 3):
        assert configure_threads(n) == n
        assert torch.get_num_threads() == n


def test_configure_threads_respects_omp_num_threads(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for current in (1, 2):
        torch.set_num_threads(current)
        assert configure_threads(0) == current
        assert torch.get_num_threads() == current  # left alone


def test_configure_threads_splits_cores_between_local_ranks(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    torch.set_num_threads(3)
    want = max(1, usable_cores() // 2)
    assert configure_threads(0) == want and torch.get_num_threads() == want
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert configure_threads(0) == usable_cores() and torch.get_num_threads() == usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "  ")  # blank is unset
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * usable_cores()))  # more ranks than cores: one each
    assert configure_threads(0) == 1 and torch.get_num_threads() == 1


# -- the eval CLI -----------------------------------------------------------------------------------
def test_eval_cli_on_a_trained_checkpoint(runs, tmp_path, capsys):
    run_dir = runs["ufp4_sr1"]["run_dir"]  # trained 2 steps, checkpoint saved at the end (save_final)
    out = tmp_path / "eval.json"
    with one_thread():
        rc = eval_cli.main([str(run_dir), "--windows", "5", "--json", str(out), "--backend", "emulated",
                            "--device", "cpu", "--threads", "1"])
        printed = capsys.readouterr()
        assert rc == 0, printed.err
        model, cfg, step = load_trained_model(run_dir, "cpu", backend="emulated")
        ds = validation_dataset(cfg)
        want = window_losses(model, ds, 5, cfg.training.micro_batch_size, NO_AUTOCAST)
        eight = summarize(window_losses(model, ds, 8, cfg.training.micro_batch_size, NO_AUTOCAST))
    res = json.loads(out.read_text())
    assert step == 2 and res["step"] == 2
    assert res["windows"] == 5 and len(res["window_losses"]) == 5
    losses = torch.tensor(res["window_losses"], dtype=torch.float64)
    assert torch.equal(losses, want)  # same weights, windows, batches and thread count: bitwise
    assert res["loss"] == float(losses.mean())
    assert abs(res["loss"] - math.fsum(res["window_losses"]) / 5) <= 4 * U64 * res["loss"]
    assert res["se"] == summarize(losses)["se"]
    assert res["label"] == "ufp4" and res["backend"] == "emulated" and res["seq_len"] == 64
    m = re.search(r"step 2: validation loss (\d+\.\d{4}) ± (\d+\.\d{4}), perplexity", printed.out)
    assert m, printed.out
    assert m.group(1) == f"{res['loss']:.4f}" and m.group(2) == f"{res['se']:.4f}"
    assert "(5 windows of 64 tokens; ufp4 on emulated)" in printed.out
    # the checkpoint holds the trained model: the training run's own final evaluation, bitwise
    last = runs["ufp4_sr1"]["records"][-1]
    assert (eight["loss"], eight["se"]) == (last["val_loss"], last["val_loss_se"])


def test_eval_cli_caps_windows_at_the_split(runs, tmp_path, capsys):
    out = tmp_path / "all.json"
    with one_thread():
        rc = eval_cli.main([str(runs["ufp4_sr1"]["run_dir"]), "--windows", "100000", "--batch-size", "32",
                            "--json", str(out), "--backend", "emulated", "--device", "cpu", "--threads", "1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    res = json.loads(out.read_text())
    n = len(runs["ufp4_sr1"]["trainer"].val_ds)
    assert res["windows"] == n == len(res["window_losses"])
    # said, not silent: one warning line naming the flag and the count scored
    warn = [ln for ln in printed.err.splitlines() if ln.strip()]
    assert len(warn) == 1 and warn[0].startswith("warning: --windows 100000") and f"scoring its {n}" in warn[0], warn


@pytest.mark.parametrize("bad", [["--windows", "0"], ["--windows", "-3"], ["--iters", "0"], ["--batch-size", "0"],
                                 ["--threads", "-1"]])
def test_eval_cli_bad_values(runs, tmp_path, capsys, bad):
    out = tmp_path / "never.json"
    with one_thread():
        rc = eval_cli.main([str(runs["ufp4_sr1"]["run_dir"]), *bad, "--json", str(out), "--device", "cpu"])
    printed = capsys.readouterr()
    assert rc == 2
    lines = printed.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), printed.err
    assert bad[0] in lines[0]
    assert printed.out == "" and not out.exists()


def test_eval_cli_missing_checkpoint(tmp_path, capsys):
    with one_thread():
        rc = eval_cli.main([str(tmp_path / "nothing_here"), "--windows", "5", "--threads", "1", "--device", "cpu"])
    printed = capsys.readouterr()
    assert rc == 2
    lines = printed.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), printed.err
