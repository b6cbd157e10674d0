"""Fixed-window evaluation (training/evaluation.py), run_info.json fingerprints and labels
(training/run_info.py), ``Recipe.label``, ``configure_threads`` and the eval CLI (eval.py),
against hand-computed values and float64 references.

The per-window loss bound (u = 2^-24 the FP32 unit roundoff, γ_n = n u / (1 - n u)).  The
evaluation computes, per token t with FP32 hidden state h_t [H] and head weight W [V, H],
``chunked_cross_entropy``'s loss ℓ_t = log s_t - (z_ty - m_t), s_t = Σ_v exp(z_tv - m_t);
the reference takes the FP32 logits of ``model(tokens)`` (``head(h).float()``, the same h and
W) and evaluates -log_softmax(z)_y in float64.  The differences:

* logits: both are FP32 H-term dot products of the same inputs, each within γ_H A_tv of the
  exact one (A = |h| |W|^T), so they differ by <= 2 γ_H max_v A_tv; ℓ is 1-Lipschitz (max
  norm) in log s and in z_y, so this moves ℓ by <= 4 γ_H max_v A_tv;
* z - m (m the exact row max): u |z_tv - m_t| <= u R_t per logit, R_t the logit range of the
  token; it moves log s by <= u R_t and the picked z_y - m by <= u R_t;
* exp: <= 4u relative (PyTorch's vectorized CPU expf is documented 1 ULP, i.e. <= 2u; 4u leaves
  a factor 2); the V-term sum of positive terms in any order: γ_(V-1) relative; a relative
  error η of s is an absolute error <= η (1 + η) of log s;
* log: <= 4u |log s_t| (log s_t in [0, log V]); the final subtraction: u |ℓ_t|;
  so  ε_t = 4 γ_H max_v A_tv + 2 u R_t + (γ_V + 4u)(1 + 2^-10) + 4u log V + u ℓ_t
  (the factor 1 + 2^-10 covers the second-order terms: η < 2^-10 here);
* the window mean over T tokens is taken in float64 (``.double().mean``) and so is the
  reference: a mean of per-token errors is at most the mean of their bounds, plus the float64
  arithmetic of both sides, <= 2 (V + T + 8) 2^-53 (1 + R_t + ℓ_t) per token.

So |window_losses_i - reference_i| <= mean_t ε_t + float64 terms.  The bound is computed from
the actual logits and hidden states of the windows, not chosen: ~5e-5 here (the observed
differences are ~3e-8), while even for this untrained, near-uniform model a label shifted by
one position moves a window's loss by 1e-3 to 5e-2 (checked in the test).
"""
from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch
from conftest import assert_state_equal, one_thread, quiet, read_metrics, snapshot

from megatron_ufp4 import eval as eval_cli
from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.training.evaluation import eval_window_count, paired_standard_error, summarize, window_losses
from megatron_ufp4.training.inference import load_trained_model
from megatron_ufp4.training.run_info import RUN_INFO, precision_label, read_run_info
from megatron_ufp4.training.run_setup import configure_threads, make_batch, usable_cores, validation_dataset
from megatron_ufp4.training.trainer import Trainer

U32 = 2.0 ** -24
U64 = 2.0 ** -53
FAST = ["logging.peak_tflops=1"]  # no start-up matmul benchmark (MFU denominator only)
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)


# -- summarize / paired_standard_error: hand-computed values ---------------------------------------
def test_summarize_hand_computed():
    res = summarize([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, sample variance 5/3, se = sqrt(5/3) / 2
    assert res["windows"] == 4
    assert res["loss"] == 2.5
    assert res["se"] == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-15)
    assert set(res) == {"loss", "se", "windows"}


def test_summarize_is_float64():
    """Differences of 2^-30 vanish in FP32 (3 + 2^-30 rounds to 3) but not in float64."""
    x = [3.0 + k * 2.0 ** -30 for k in range(4)]
    res = summarize(x)
    assert res["loss"] == 3.0 + 1.5 * 2.0 ** -30  # exact in float64
    assert res["se"] == pytest.approx(2.0 ** -30 * math.sqrt(5 / 3) / 2, rel=1e-9)
    assert summarize(torch.tensor(x, dtype=torch.float64))["se"] == res["se"]


def test_summarize_edge_cases():
    one = summarize([2.75])
    assert one["loss"] == 2.75 and one["windows"] == 1 and math.isnan(one["se"])  # no spread from one window
    with pytest.raises(ValueError, match="no validation windows"):
        summarize([])
    assert summarize([5.0, 5.0, 5.0])["se"] == 0.0


def test_paired_standard_error_hand_computed():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.5, 2.5, 2.0, 4.5]
    # d = a - b = [0.5, -0.5, 1, -0.5]: mean 0.125, squared deviations 0.140625 + 0.390625 + 0.765625
    # + 0.390625 = 1.6875, sample variance 0.5625, sd 0.75, se = 0.75 / 2
    assert paired_standard_error(a, b) == pytest.approx(0.375, rel=1e-15)
    assert paired_standard_error(b, a) == paired_standard_error(a, b)
    # a constant shift of every window has no paired error, however noisy the windows are
    assert paired_standard_error(a, [x + 0.25 for x in a]) == 0.0
    assert summarize(a)["se"] > 0
    assert math.isnan(paired_standard_error([1.0], [2.0]))


# -- eval_window_count ----------------------------------------------------------------------------
def test_eval_window_count(tiny_cfg, tmp_path):
    cfg = tiny_cfg("tiny_dense", tmp_path)  # eval_iters=2, micro_batch_size=4, eval_windows null
    assert cfg.training.eval_windows is None
    assert eval_window_count(cfg, 159) == 2 * 4
    assert eval_window_count(cfg, 5) == 5  # capped at the windows the split has
    cfg5 = tiny_cfg("tiny_dense", tmp_path, "training.eval_windows=5")
    assert eval_window_count(cfg5, 159) == 5
    assert eval_window_count(cfg5, 3) == 3
    big = tiny_cfg("tiny_dense", tmp_path, "training.eval_windows=100000")
    assert eval_window_count(big, 159) == 159
    many_iters = tiny_cfg("tiny_dense", tmp_path, "training.eval_iters=1000")
    assert eval_window_count(many_iters, 159) == 159


# -- window losses against a float64 reference ------------------------------------------------------
@pytest.fixture(scope="module")
def eval_trainer(tiny_cfg, tmp_path_factory):
    """An untrained tiny UFP4 model (FP4 forward GEMMs, high-precision head) and its val split."""
    with one_thread():
        trainer = Trainer(tiny_cfg("tiny_dense", tmp_path_factory.mktemp("eval"), "recipe.name=ufp4", *FAST),
                          console=quiet)
    yield trainer
    trainer.close()


@torch.no_grad()
def reference_and_bound(model, tokens, labels):
    """Per-window float64 reference losses of the model's FP32 logits and the FP32 bound (module doc)."""
    h = model.hidden_states(tokens)
    z = model(tokens)  # (B, T, V) float32: head(h).float()
    assert z.dtype == torch.float32 and z.shape[:2] == tokens.shape
    z64 = z.double()
    nll = -torch.log_softmax(z64, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    V, H, T = z.shape[-1], h.shape[-1], tokens.shape[1]
    R = z64.amax(-1) - z64.amin(-1)  # logit range per token
    A = (h.double().abs() @ model.head.weight.double().abs().t()).amax(-1)  # max_v Σ_k |h_k| |W_vk|
    eps = (4 * gamma(H) * A + 2 * U32 * R + (gamma(V) + 4 * U32) * (1 + 2 ** -10) + 4 * U32 * math.log(V)
           + U32 * nll)
    eps64 = 2 * (V + T + 8) * U64 * (1 + R + nll)
    return nll.mean(dim=1), (eps + eps64).mean(dim=1)


def test_window_losses_match_float64_reference(eval_trainer):
    model, ds = eval_trainer.model, eval_trainer.val_ds
    n, batch = 7, 3  # batches of 3, 3, 1 windows
    with one_thread():
        got = window_losses(model, ds, n, batch, NO_AUTOCAST)
        tokens, labels = make_batch(ds, range(n), "cpu")
        ref, bound = reference_and_bound(model, tokens, labels)
    assert got.dtype == torch.float64 and got.shape == (n,)
    assert model.training  # window_losses put the model back in training mode
    diff = (got - ref).abs()
    assert (diff <= bound).all(), f"|window - reference| {diff.tolist()} exceeds bound {bound.tolist()}"
    assert (bound < 1e-3).all()  # the bound is tight enough to mean something (losses are ~6)
    assert torch.all((ref > 4) & (ref < 8))  # ~log 512 = 6.24 for an untrained model
    # distinct windows: window i is not window j (the losses are not one window repeated)
    assert len(set(got.tolist())) == n
    # the bound has power: the reference of labels shifted by one position is outside it
    with torch.no_grad():
        shifted, _ = reference_and_bound(model, tokens, torch.roll(labels, 1, dims=1))
    assert ((got - shifted).abs() > bound).all()


def test_window_losses_are_the_first_windows_of_the_stream(eval_trainer):
    """Window i is ds[i] (the unshuffled val split): the first k windows of a longer evaluation are
    the windows of a shorter one."""
    model, ds = eval_trainer.model, eval_trainer.val_ds
    with one_thread():
        five = window_losses(model, ds, 5, 4, NO_AUTOCAST)
        two = window_losses(model, ds, 2, 4, NO_AUTOCAST)
        tokens, labels = make_batch(ds, [3], "cpu")
        ref3, bound3 = reference_and_bound(model, tokens, labels)
    assert torch.equal(five[:2], two)
    assert abs(float(five[3] - ref3[0])) <= float(bound3[0])


def test_window_losses_do_not_depend_on_batch_size(eval_trainer):
    """Every op of the eval forward is per token or per sequence (FP4 blocks and RHT along the
    features, attention within a window), so a window is the same FP32 operations in any batch;
    on this CPU build the GEMM kernels' per-row results do not depend on the row count, so equal
    bitwise."""
    model, ds = eval_trainer.model, eval_trainer.val_ds
    with one_thread():
        by_1 = window_losses(model, ds, 6, 1, NO_AUTOCAST)
        by_3 = window_losses(model, ds, 6, 3, NO_AUTOCAST)
        by_4 = window_losses(model, ds, 6, 4, NO_AUTOCAST)  # 4 + 2
    assert torch.equal(by_1, by_3), (by_1 - by_3).abs().max()
    assert torch.equal(by_1, by_4), (by_1 - by_4).abs().max()


def test_window_losses_capped_at_the_dataset(eval_trainer):
    model, ds = eval_trainer.model, eval_trainer.val_ds
    with one_thread():
        every = window_losses(model, ds, len(ds) + 5, 16, NO_AUTOCAST)
    assert every.shape == (len(ds),)
    assert torch.isfinite(every).all()
    assert window_losses(model, ds, 0, 4, NO_AUTOCAST).shape == (0,)


def test_window_mean_is_the_token_mean(eval_trainer):
    """The old definition (pre fixed windows): each micro-batch's FP32 mean loss, weighted by its
    windows, averaged in float64.  Every window has T tokens, so the window mean is the token mean.
    Bound: a micro-batch mean is an FP32 sum of N = b T per-token losses (γ_(N-1) relative) and a
    division (u), and each per-token loss is within ε_t of the reference (bound of the windows)."""
    model, ds = eval_trainer.model, eval_trainer.val_ds
    n, batch = 8, 3
    with one_thread(), torch.no_grad():
        windows = window_losses(model, ds, n, batch, NO_AUTOCAST)
        total, count, slack = 0.0, 0, 0.0
        for s in range(0, n, batch):
            tokens, labels = make_batch(ds, range(s, min(n, s + batch)), "cpu")
            mean = model(tokens, labels=labels)  # reduction="mean", FP32
            b = tokens.shape[0]
            total += float(mean) * b
            count += b
            slack += (gamma(b * tokens.shape[1]) + U32) * float(mean) * b
    old = total / count
    new = float(windows.mean())
    assert summarize(windows)["loss"] == new
    assert abs(new - old) <= slack / count + 1e-15, (new, old, slack / count)


def test_forward_reduction_none_is_per_token(eval_trainer):
    model, ds = eval_trainer.model, eval_trainer.val_ds
    with one_thread(), torch.no_grad():
        tokens, labels = make_batch(ds, range(3), "cpu")
        per_token = model(tokens, labels=labels, reduction="none")
        mean = model(tokens, labels=labels, reduction="mean")
        ref, _ = reference_and_bound(model, tokens, labels)
    assert per_token.shape == tokens.shape and per_token.dtype == torch.float32
    assert mean.shape == ()
    n = per_token.numel()
    # reduction="mean" sums the same FP32 per-token values (n terms: γ_(n-1)) and divides (u)
    want = per_token.double().mean()
    assert abs(float(mean) - float(want)) <= (gamma(n) + U32) * float(want)
    # and the per-token losses are the windows' losses before their mean
    assert torch.equal(per_token.double().mean(dim=1), window_losses(model, ds, 3, 3, NO_AUTOCAST))
    assert (per_token.double().mean(dim=1) - ref).abs().max() < 1e-4


def test_trainer_evaluate_returns_window_summary(eval_trainer):
    model, ds, t = eval_trainer.model, eval_trainer.val_ds, eval_trainer.cfg.training
    with one_thread():
        res = eval_trainer.evaluate()  # eval_windows null: eval_iters x micro_batch_size = 2 x 4
        assert set(res) == {"loss", "se", "windows"} and res["windows"] == 8
        assert res == summarize(window_losses(model, ds, 8, 4, NO_AUTOCAST))
        before = t.eval_windows
        try:
            t.eval_windows = 5
            five = eval_trainer.evaluate()
            t.eval_windows = 10 ** 6
            every = eval_trainer.evaluate()
        finally:
            t.eval_windows = before
    assert five["windows"] == 5 and five == summarize(window_losses(model, ds, 5, 4, NO_AUTOCAST))
    assert every["windows"] == len(ds)


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
    assert set(fp) == {"init", "data_order"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", fp[k]) for k in fp)
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
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    n = len(runs["ufp4_sr1"]["trainer"].val_ds)
    assert res["windows"] == n == len(res["window_losses"])


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
