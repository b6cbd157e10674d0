"""Fixed-window evaluation, run labels, run_info fingerprints, SR seeds, threads and the eval CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.training.evaluation import eval_window_count, paired_standard_error, summarize, window_losses
from megatron_ufp4.training.run_info import precision_label, read_run_info
from megatron_ufp4.training.run_setup import configure_threads, make_batch, usable_cores
from megatron_ufp4.training.trainer import Trainer

from conftest import one_thread, quiet

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def trainer(tiny_cfg, tmp_path_factory):
    with one_thread():
        t = Trainer(tiny_cfg("tiny_dense", tmp_path_factory.mktemp("eval"), "recipe.name=ufp4",
                             "training.train_steps=3", "training.eval_windows=7"), console=quiet)
        for _ in range(2):
            t.train_step()
        yield t


def test_summarize_and_paired_error_by_hand():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["loss"] == 2.5 and s["windows"] == 4
    assert s["se"] == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-15)  # sd (n-1) = sqrt(5/3)
    assert math.isnan(summarize([3.0])["se"])
    # differences [0.5, -0.5, 1.5]: mean 0.5, sd 1, se 1/sqrt(3)
    assert paired_standard_error([1.5, 1.5, 3.5], [1.0, 2.0, 2.0]) == pytest.approx(1 / math.sqrt(3), rel=1e-15)
    with pytest.raises(ValueError):
        summarize([])


def test_window_losses_match_float64_reference(trainer):
    model, ds = trainer.model, trainer.val_ds
    got = window_losses(model, ds, 5, 2, NO_AUTOCAST)
    tokens, labels = make_batch(ds, range(5), "cpu")
    model.eval()
    with torch.no_grad():
        logits = model(tokens).double()  # fp32 logits, everything after in float64
    model.train()
    ref = -logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1).mean(-1)
    # The evaluator's fp32 chunked cross entropy differs from the float64 one on the same fp32
    # logits by the rounding of a log-sum-exp over V terms and one subtraction: per token at
    # most (V + 4) u (1 + max|logit|) with u = 2^-24, and a window mean is no worse; the head
    # GEMM inside the chunked loss is the same fp32 product as model(tokens)'s.
    vocab = logits.shape[-1]
    bound = (vocab + 4) * 2.0 ** -24 * (1 + float(logits.abs().max()))
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert (got - ref).abs().max() <= bound, ((got - ref).abs().max(), bound)
    # the windows do not depend on the batch size; the mean is the token mean
    assert torch.allclose(window_losses(model, ds, 5, 1, NO_AUTOCAST), got, rtol=0, atol=bound)
    with torch.no_grad():
        mean = model(tokens, labels=labels).double()
    assert abs(float(got.mean()) - float(mean)) <= bound


def test_reduction_none_gives_per_token_losses(trainer):
    tokens, labels = make_batch(trainer.val_ds, range(3), "cpu")
    with torch.no_grad():
        per_token = trainer.model(tokens, labels=labels, reduction="none")
        mean = trainer.model(tokens, labels=labels)
    assert per_token.shape == labels.shape
    # the same per-token fp32 values, summed in another order: within n u |sum| for n tokens
    n = per_token.numel()
    assert abs(float(per_token.double().mean()) - float(mean)) <= n * 2.0 ** -24 * float(per_token.abs().mean())


def test_eval_windows_setting(trainer, tiny_cfg, tmp_path):
    res = trainer.evaluate()
    assert res["windows"] == 7 and math.isfinite(res["se"]) and res["se"] > 0
    cfg = tiny_cfg("tiny_dense", tmp_path, "training.eval_iters=3")
    assert eval_window_count(cfg, 10 ** 6) == 3 * cfg.training.micro_batch_size  # null: iters x batch
    assert eval_window_count(cfg, 5) == 5  # at most the split
    with pytest.raises(ValueError, match="training.eval_windows"):
        tiny_cfg("tiny_dense", tmp_path, "training.eval_windows=0")


def test_recipe_labels():
    assert [Recipe.from_dict({"name": n}).label() for n in ("ufp4", "nvfp4", "bf16")] == ["ufp4", "nvfp4", "bf16"]
    assert Recipe.from_dict({"name": "ufp4", "format": "e2m1"}).label() == "ufp4[format=e2m1]"
    assert Recipe.from_dict({"name": "ufp4", "sr": []}).label() == "ufp4[sr=none]"
    assert Recipe.from_dict({"name": "ufp4", "rht": ["wgrad", "dgrad", "fprop"]}).label() == "ufp4"  # a no-op
    assert Recipe.from_dict({"name": "ufp4", "wgrad": {"dy": {"rounding": "rtne"}}}).label() == \
        "ufp4[wgrad.dy.rounding=rtne]"
    bf16 = Recipe.preset("bf16")
    assert precision_label(bf16, "fp32") == "fp32" and precision_label(bf16, "bf16") == "bf16"
    assert precision_label(Recipe.preset("ufp4"), "bf16") == "ufp4"


def _info_and_losses(tiny_cfg, run_dir, *extra, steps=2):
    with one_thread():
        t = Trainer(tiny_cfg("tiny_dense", run_dir, "training.train_steps=4", *extra), console=quiet)
        recs = [t.train_step() for _ in range(steps)]
    return read_run_info(run_dir), [(r["loss"], r["grad_norm"]) for r in recs]


def test_fingerprints_and_sr_seed(tiny_cfg, tmp_path):
    base, base_losses = _info_and_losses(tiny_cfg, tmp_path / "a", "recipe.name=ufp4")
    bf16, _ = _info_and_losses(tiny_cfg, tmp_path / "b", "recipe.name=bf16", steps=0)
    other_seed, _ = _info_and_losses(tiny_cfg, tmp_path / "c", "recipe.name=ufp4", "training.seed=99", steps=0)
    sr1, sr1_losses = _info_and_losses(tiny_cfg, tmp_path / "d", "recipe.name=ufp4", "training.sr_seed=1")
    sr1_again, sr1_again_losses = _info_and_losses(tiny_cfg, tmp_path / "e", "recipe.name=ufp4",
                                                   "training.sr_seed=1")
    assert base["label"] == "ufp4" and bf16["label"] == "fp32"
    assert base["fingerprint"] == bf16["fingerprint"]  # the recipe changes neither weights nor data order
    assert base["fingerprint"]["init"] != other_seed["fingerprint"]["init"]
    assert base["fingerprint"]["data_order"] != other_seed["fingerprint"]["data_order"]
    assert sr1["fingerprint"] == base["fingerprint"] and sr1["sr_seed"] == 1
    # SR (on dY) changes the gradients from the first step; the same sr_seed reproduces them bitwise
    assert sr1_losses[0][1] != base_losses[0][1]
    assert sr1_losses == sr1_again_losses


def test_configure_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(1)
        assert configure_threads(0) == 1  # OMP_NUM_THREADS set: left as it is
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert configure_threads(0) == max(1, usable_cores() // 2) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_eval_cli_windows_and_json(trained_run, tmp_path, capsys):
    from megatron_ufp4 import eval as eval_cli
    from megatron_ufp4.training.inference import load_trained_model
    from megatron_ufp4.training.run_setup import validation_dataset

    run_dir, _ = trained_run
    out = tmp_path / "e.json"
    with one_thread():
        assert eval_cli.main([str(run_dir), "--windows", "5", "--json", str(out), "--backend", "emulated",
                              "--threads", "1"]) == 0
        printed = capsys.readouterr().out
        res = json.loads(out.read_text())
        model, cfg, _ = load_trained_model(run_dir)
        want = window_losses(model, validation_dataset(cfg), 5, cfg.training.micro_batch_size, NO_AUTOCAST)
    assert "validation loss" in printed and " ± " in printed and "5 windows" in printed
    assert res["windows"] == 5 and res["window_losses"] == want.tolist()  # the same computation, bitwise
    assert res["loss"] == pytest.approx(math.fsum(res["window_losses"]) / 5, rel=1e-15)
    assert res["label"] == "ufp4" and res["backend"] == "emulated"
    assert eval_cli.main([str(run_dir), "--windows", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --windows")
