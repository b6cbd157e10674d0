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

import math

import pytest
import torch
from conftest import one_thread, quiet
from error_bounds import U32, U64, gamma

from megatron_ufp4.training.evaluation import eval_window_count, paired_standard_error, summarize, window_losses
from megatron_ufp4.training.run_setup import make_batch
from megatron_ufp4.training.trainer import Trainer

pytestmark = pytest.mark.numerical

FAST = ["logging.peak_tflops=1"]  # no start-up matmul benchmark (MFU denominator only)
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


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
