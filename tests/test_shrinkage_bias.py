"""Shrinkage-bias analyzer (megatron_ufp4.fp4.analysis, tools/shrinkage_bias.py): arXiv 2606.20381."""
import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_ufp4.fp4 import E2M1, INT4, RHT, fake_quantize
from megatron_ufp4.fp4.analysis import (analytic_level_bias, analyze, effective_bucket_ratio, empirical_level_bias,
                                        load_tensor, make_tensor, quantization_metrics)

pytestmark = pytest.mark.numerical

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "tools", "shrinkage_bias.py")
sys.path.insert(0, os.path.join(REPO, "tools"))
import shrinkage_bias  # noqa: E402  (the CLI module, for in-process error-path tests)

HEAVY_TAILED = dict(dist="student_t", df=3.0)  # the documented example where RHT hurts E2M1 and helps INT4


# -- per-level bias -------------------------------------------------------------------------

def test_analytic_level_bias():
    assert analytic_level_bias(E2M1) == [None, 0.0, 0.0, 0.0, -0.125, 0.0, -0.25, None]
    assert analytic_level_bias(INT4) == [None] + [0.0] * 6 + [None]


@pytest.mark.parametrize("grid", [E2M1, INT4], ids=lambda g: g.name)
def test_empirical_level_bias_matches_analytic(grid):
    emp = empirical_level_bias(grid, samples=200_000, seed=1)
    q = grid.levels
    # interior: the formula; edges are one-sided: level 0 only shrinks, the top level only grows
    interior = [(2 * q[i] - q[i - 1] - q[i + 1]) / 4 for i in range(1, len(q) - 1)]
    expected = [-q[1] / 4] + interior + [(q[-1] - q[-2]) / 4]
    for i, (mean, se, want) in enumerate(zip(emp["mean"], emp["stderr"], expected)):
        assert se < 0.005, f"level {q[i]}: Monte Carlo error too large to test ({se})"
        assert abs(mean - want) < 5 * se, f"{grid.name} level {q[i]}: {mean:.4f} vs {want:.4f} (se {se:.4f})"
    assert sum(emp["count"]) == 200_000


# -- metrics ----------------------------------------------------------------------------------

def test_metrics_hand_checked_on_one_block():
    # one 1x16 block with amax 6, so the E2M1 scale is exactly 1 and the rounding is by hand:
    x = [6.0, 0.3, 1.2, 2.4, 3.5, 4.9, 5.1, -0.7, 1.76, 2.5, -3.2, 0.1, 0.0, 1.0, -4.5, 0.26]
    # ties 3.5->4, 2.5->2, 4.5->4
    q = [6.0, 0.5, 1.0, 2.0, 4.0, 4.0, 6.0, -0.5, 2.0, 2.0, -3.0, 0.0, 0.0, 1.0, -4.0, 0.5]
    x32 = np.array(x, dtype=np.float32).astype(np.float64)  # what the quantizer actually sees
    qa = np.array(q)
    m = quantization_metrics(torch.tensor([x]), "e2m1")
    assert m["alpha"] == pytest.approx((qa @ x32) / (x32 @ x32), rel=1e-12)
    want_nmse = ((qa - x32) ** 2).sum() / (x32 @ x32)
    assert m["nmse"] == pytest.approx(want_nmse, rel=1e-12)
    assert m["sqnr_db"] == pytest.approx(-10 * math.log10(want_nmse), rel=1e-12)
    # B_eff from the by-hand bucket counts (magnitude codes of q):
    counts = np.bincount([E2M1.levels.index(abs(v)) for v in q], minlength=8)
    p = counts[counts > 0] / 16
    assert m["b_eff"] == pytest.approx(math.exp(-(p * np.log(p)).sum()) / 8, rel=1e-12)


def test_rht_metrics_are_measured_in_the_rotated_basis():
    x = make_tensor("gaussian", 4, 32, seed=3)
    rht = RHT(16, seed=5)
    r64 = rht.signs.double()[:, None] * torch.tensor(_hadamard16()) / 4.0  # float64 rotation
    ref = (x.double().reshape(-1, 16) @ r64).reshape(4, 32)
    deq = fake_quantize(x, "int4", rht=rht).double()
    m = quantization_metrics(x, "int4", rht)
    assert m["nmse"] == pytest.approx(((deq - ref) ** 2).sum().item() / (ref ** 2).sum().item(), rel=1e-4)
    assert m["alpha"] == pytest.approx((deq * ref).sum().item() / (ref ** 2).sum().item(), rel=1e-5)


def _hadamard16():
    h = np.array([[1.0]])
    while h.shape[0] < 16:
        h = np.block([[h, h], [h, -h]])
    return h


def test_effective_bucket_ratio_bounds():
    assert effective_bucket_ratio(torch.arange(16, dtype=torch.uint8)) == pytest.approx(1.0)  # all 8 used equally
    assert effective_bucket_ratio(torch.full((10,), 3, dtype=torch.uint8)) == pytest.approx(1 / 8)
    report = analyze(make_tensor("laplace", 64, 256, seed=0), bias_samples=1000)
    for fmt in report["formats"].values():
        for basis in ("identity", "rht"):
            assert 0 < fmt[basis]["b_eff"] <= 1


def test_gaussian_alpha_e2m1_shrinks_int4_does_not():
    x = make_tensor("gaussian", 256, 256, seed=0)
    e2m1, int4 = quantization_metrics(x, "e2m1")["alpha"], quantization_metrics(x, "int4")["alpha"]
    assert e2m1 < 0.998  # E2M1's coarse levels at 2 and 4 pull magnitudes towards zero
    assert abs(int4 - 1) < 0.003
    # on Gaussian blocks RHT changes almost nothing
    rht = RHT(16, seed=0)
    for fmt in ("e2m1", "int4"):
        delta = quantization_metrics(x, fmt)["sqnr_db"] - quantization_metrics(x, fmt, rht)["sqnr_db"]
        assert abs(delta) < 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heavy_tailed_rht_lowers_e2m1_and_raises_int4(seed):
    x = make_tensor(rows=128, cols=256, seed=seed, **HEAVY_TAILED)
    report = analyze(x, formats=("e2m1", "int4"), seed=seed, bias_samples=1000)
    e2m1, int4 = report["formats"]["e2m1"], report["formats"]["int4"]
    assert e2m1["rht"]["sqnr_db"] < e2m1["identity"]["sqnr_db"] and e2m1["delta_sqnr_db"] < -0.3
    assert int4["rht"]["sqnr_db"] > int4["identity"]["sqnr_db"] and int4["delta_sqnr_db"] > 2.0
    # as in the paper: E2M1 wins without the rotation, the uniform grid wins with it
    assert e2m1["identity"]["sqnr_db"] > int4["identity"]["sqnr_db"]
    assert int4["rht"]["sqnr_db"] > e2m1["rht"]["sqnr_db"]


def test_analyze_is_json_serialisable_and_validates():
    report = analyze(make_tensor("gaussian", 8, 64, seed=0), bias_samples=1000)
    assert json.loads(json.dumps(report, allow_nan=False))["formats"].keys() == {"e2m1", "int4", "nvfp4", "nvint4",
                                                                                 "mxfp4"}
    assert report["per_level_bias"]["e2m1"]["analytic"][4] == -0.125
    with pytest.raises(ValueError, match="multiple of 32"):
        analyze(torch.randn(4, 48))
    with pytest.raises(ValueError, match="all zeros"):
        analyze(torch.zeros(4, 64))
    with pytest.raises(ValueError, match="df"):
        make_tensor("student_t", 4, 64, df=0)


# -- loading --------------------------------------------------------------------------------

def test_load_tensor_and_dict(tmp_path):
    t = torch.randn(4, 2, 64)
    torch.save(t, tmp_path / "t.pt")
    assert torch.equal(load_tensor(str(tmp_path / "t.pt")), t.reshape(8, 64))

    d = {"a": torch.randn(3, 64), "b": torch.randn(2, 64).bfloat16(), "step": torch.tensor(7)}
    torch.save(d, tmp_path / "d.pt")
    assert load_tensor(str(tmp_path / "d.pt")).shape == (5, 64)  # the int counter is skipped

    torch.save({"w": torch.randn(2, 64), "norm": torch.randn(32)}, tmp_path / "mixed.pt")
    assert load_tensor(str(tmp_path / "mixed.pt"), multiple=32).shape == (5, 32)  # re-chunked to 32 wide

    torch.save({"w": torch.randn(2, 40)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="multiple of 32"):
        load_tensor(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="no such file"):
        load_tensor(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot load"):
        load_tensor(str(tmp_path / "junk.pt"))


# -- CLI ---------------------------------------------------------------------------------------

FAST = ["--bias-samples", "20000"]


def test_cli_json_runs_as_a_script():
    out = subprocess.run([sys.executable, CLI, "--rows", "32", "--cols", "64", "--json"] + FAST,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["input"] == "gaussian" and report["shape"] == [32, 64] and report["num_buckets"] == 8
    assert set(report["formats"]["e2m1"]) == {"description", "identity", "rht", "delta_sqnr_db"}


def test_cli_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    # run the script's __main__ block in-process (a second subprocess would re-import torch)
    monkeypatch.setattr(sys, "argv", [CLI, "--input", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(CLI, run_name="__main__")
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "missing.pt" in captured.err


def test_cli_plot_writes_png(tmp_path, capsys):
    png = tmp_path / "bias.png"
    assert shrinkage_bias.main(["--rows", "8", "--cols", "64", "--json", "--plot", str(png)] + FAST) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert shrinkage_bias.main(["--rows", "8", "--cols", "64", "--plot", str(tmp_path / "x.png")] + FAST) == 2
    assert capsys.readouterr().err.strip() == ("shrinkage_bias.py: error: --plot needs matplotlib "
                                               "(pip install matplotlib)")


@pytest.mark.parametrize("argv", [
    ["--dist", "student_t", "--df", "-1"],
    ["--formats", "e2m1,bogus"],
    ["--cols", "48"],
    ["--rows", "0"],
    ["--df", "abc"],
    ["--dist", "gaussian", "--input", "x.pt"],
])
def test_cli_user_errors_in_process(argv, capsys):
    assert shrinkage_bias.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("shrinkage_bias.py: error:")


def test_cli_text_table(capsys):
    assert shrinkage_bias.main(["--rows", "8", "--cols", "64"] + FAST) == 0
    text = capsys.readouterr().out
    assert "K=8 magnitude buckets" in text
    for name in ("e2m1", "int4", "nvfp4", "nvint4", "mxfp4"):
        assert any(line.startswith(name + " ") for line in text.splitlines())
    assert "-0.1250" in text and "-0.2500" in text  # analytic E2M1 bias at 2 and 4
