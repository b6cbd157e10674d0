"""Live operand telemetry (``logging.quant_stats_interval``): when it is recorded, that it leaves
training bit for bit unchanged, that its numbers are right, and the figures drawn from it."""
from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from megatron_ufp4.config import ConfigError
from megatron_ufp4.fp4 import RHT, fake_quantize, make_format, quantize
from megatron_ufp4.linear import QuantizedLinear, quant_stats, set_quant_stats
from megatron_ufp4.training.trainer import Trainer

from conftest import CONFIGS, REPO_ROOT, assert_state_equal, quiet, read_metrics, snapshot

pytestmark = [pytest.mark.numerical, pytest.mark.usefixtures("single_thread")]

U32 = 2.0 ** -24  # fp32 unit roundoff
U64 = 2.0 ** -53  # float64 unit roundoff

# 4 steps, validation at 2 and 4, no checkpoint: the cheapest run that has two statistics steps
RUN = ["training.train_steps=4", "training.eval_interval=2", "checkpoint.interval=0", "checkpoint.save_final=false",
       "schedule.warmup_steps=1"]


def _train(tiny_cfg, run_dir, recipe: str, interval: int) -> dict:
    """Train RUN through Trainer.train(), keeping every record train_step returns."""
    cfg = tiny_cfg("tiny_dense", run_dir, f"recipe.name={recipe}", *RUN, f"logging.quant_stats_interval={interval}")
    trainer = Trainer(cfg, console=quiet)
    records = []
    step = trainer.train_step

    def recording_step():
        rec = step()
        records.append(rec)
        return rec

    trainer.train_step = recording_step
    try:
        trainer.train()
        quantized = sorted(n for n, m in trainer.model.named_modules()
                           if isinstance(m, QuantizedLinear) and m.quantized)
        return {"run_dir": run_dir, "records": records, "model": snapshot(trainer.model.state_dict()),
                "quantized": quantized}
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def runs(tiny_cfg, tmp_path_factory):
    """``runs(recipe, interval)`` -> the trained run (each computed once per module)."""
    cache: dict = {}

    def get(recipe: str, interval: int) -> dict:
        if (recipe, interval) not in cache:
            cache[recipe, interval] = _train(tiny_cfg, tmp_path_factory.mktemp(f"{recipe}_q{interval}"), recipe,
                                             interval)
        return cache[recipe, interval]

    return get


# what each recipe's GEMMs run (the presets of fp4/recipes.py): RHT per GEMM ("off" or its size)
RHT_OF = {"ufp4": {"fprop": "16", "dgrad": "16", "wgrad": "16"},
          "nvfp4": {"fprop": "off", "dgrad": "off", "wgrad": "16"}}


@pytest.mark.parametrize("recipe", ["ufp4", "nvfp4"])  # both round dY stochastically
def test_statistics_every_n_steps_leave_training_unchanged(runs, recipe):
    on, off = runs(recipe, 2), runs(recipe, 0)
    assert [r["step"] for r in on["records"]] == [1, 2, 3, 4]
    assert [r["step"] for r in on["records"] if "quant" in r] == [2, 4]
    assert not any("quant" in r for r in off["records"])
    # telemetry observes: the same losses, gradient norms and final weights, bit for bit
    for a, b in zip(on["records"], off["records"], strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), f"step {a['step']}"
        assert a.get("val_loss") == b.get("val_loss"), f"step {a['step']}"
    assert_state_equal(on["model"], off["model"], "model")  # weights, SR generator states, RHT signs
    for rec in (r for r in on["records"] if "quant" in r):
        q = rec["quant"]
        assert sorted(q) == on["quantized"] and q  # every quantized linear of the model, nothing else
        for name, gemms in q.items():
            assert set(gemms) == {"fprop", "dgrad", "wgrad"}, name
            for g, row in gemms.items():
                assert row["recipe"] == recipe and row["backend"] == "emulated" and row["rht"] == RHT_OF[recipe][g]
                roles = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("dy", "x")}[g]
                assert set(row["ran"]) == set(roles)
                for role in roles:
                    assert row["ran"][role].endswith(" sr" if role == "dy" else " rtne"), (name, g, role)
                    st = row[role]
                    assert 0 < st["nmse"] < 1 and st["amax"] > 0 and 0 <= st["saturated"] <= 1
                    # sqnr_db is 10 log10(1 / nmse): the same float64 expression, so equal up to one rounding
                    # of log10 and of the product (2 ulps)
                    assert st["sqnr_db"] == pytest.approx(10 * math.log10(1 / st["nmse"]), rel=4 * U64)
    # the records went into metrics.jsonl as they were returned (JSON keeps Python floats exactly)
    logged = {r["step"]: r for r in read_metrics(on["run_dir"])}
    for rec in on["records"]:
        assert logged[rec["step"]].get("quant") == rec.get("quant")


def _rotated64(x: torch.Tensor, rht: RHT) -> torch.Tensor:
    """x R tile by tile along the last dim, in float64 with the explicit matrix (not the butterfly)."""
    n = rht.size
    return (x.double().reshape(-1, n) @ rht.matrix64()).reshape(x.shape)


def _per_element(dec: torch.Tensor, shape, block: int, block_2d: bool) -> torch.Tensor:
    """A QuantizedTensor's per-block decode multipliers broadcast to its elements (blocks along the last dim)."""
    r, c = shape
    if block_2d:
        return dec.reshape(r // block, 1, c // block, 1).expand(r // block, block, c // block, block).reshape(r, c)
    return dec.reshape(r, c // block, 1).expand(r, c // block, block).reshape(r, c)


def _reference_stats(t: torch.Tensor, fmt_name: str, block_2d: bool, rht: RHT | None, grid_max: float) -> dict:
    """An operand's statistics from fake_quantize's output, computed here in float64 (definitions:
    fp4/quantize.py _operand_stats; the source is the rotated fp32 tensor the quantizer rounds)."""
    fmt = make_format(fmt_name, block_2d=block_2d or None)
    deq = fake_quantize(t, fmt, -1, "rtne", rht)  # rotated basis, what the GEMM multiplies
    qt = quantize(t, fmt, -1, "rtne", rht)  # the storage path: codes and scales
    assert torch.equal(qt.dequantize(rotated=True), deq)  # documented bitwise equal
    src = rht.rotate(t) if rht is not None else t.float()
    if rht is not None:
        # the butterfly against the float64 matrix: per element the rotation rounds log2(n) additions and one
        # scaling, |err_j| <= (log2 n + 1) u ||tile|| (sum|x_i| <= sqrt(n) ||tile||), so over a tile and the
        # whole tensor ||err|| <= sqrt(n) (log2 n + 1) u ||src||
        ref = _rotated64(t, rht)
        bound = math.sqrt(rht.size) * (math.log2(rht.size) + 1) * U32
        assert float((src.double() - ref).norm() / ref.norm()) <= bound
        assert torch.equal(fake_quantize(src, fmt, -1, "rtne", None), deq)  # rotate first, then quantize
    d, s = deq.double(), src.double()
    energy = (s * s).sum()
    dec32 = _per_element(qt.decode_scales, t.shape, fmt.block, fmt.block_2d)
    dec = dec32.double()
    clipped = (s.abs() > grid_max * dec * (1 + 2 ** -20)) & (dec > 0)
    # a clipped element sits on its block's largest grid point (dequantized in fp32: grid value x multiplier)
    assert torch.equal(deq.abs()[clipped], (grid_max * dec32)[clipped])
    return {"amax": float(s.abs().max()), "alpha": float((d * s).sum() / energy),
            "nmse": float(((d - s) ** 2).sum() / energy), "saturated": float(clipped.sum()) / t.numel(),
            "zeroed": float(((d == 0) & (s != 0)).sum()) / t.numel()}


# recipe -> (label, fprop: (x format, w format, w 2D blocks, RHT size or None), grid max): the presets of
# fp4/recipes.py written out; int4 is the uniform grid 0..7, e2m1's largest magnitude is 6
CASES = [
    ("ufp4", "ufp4", ("int4", "int4", False, 16), 7.0),
    ("e2m1_ref", "e2m1_ref", ("e2m1", "e2m1", False, None), 6.0),
    ({"name": "ufp4", "format": "e2m1"}, "ufp4[format=e2m1]", ("e2m1", "e2m1", False, 16), 6.0),
    ("nvfp4", "nvfp4", ("nvfp4", "nvfp4", True, None), 6.0),
    ("mxfp4", "mxfp4", ("mxfp4", "mxfp4", False, 32), 6.0),
]


@pytest.mark.parametrize("recipe,label,fprop,grid_max", CASES, ids=[c[1] for c in CASES])
def test_operand_statistics_match_a_float64_reference(recipe, label, fprop, grid_max):
    x_fmt, w_fmt, w_2d, rht_size = fprop
    torch.manual_seed(0)
    lin = QuantizedLinear(64, 32, recipe=recipe, sr_seed=3)
    model = nn.Sequential(OrderedDict(proj=lin))
    g = torch.Generator().manual_seed(1)
    # heavy-tailed activations: blocks of very different ranges, so some values round to zero and
    # (with rounded scales) some saturate
    x = (torch.randn(3, 5, 64, generator=g) * torch.randn(3, 5, 64, generator=g).exp()).requires_grad_()
    probe = torch.randn(3, 5, 32, generator=g)

    model(x).mul(probe).sum().backward()  # statistics off: nothing is recorded
    assert quant_stats(model) == {}
    set_quant_stats(model, True)
    model(x).mul(probe).sum().backward()
    stats = quant_stats(model)
    assert list(stats) == ["proj"] and set(stats["proj"]) == {"fprop", "dgrad", "wgrad"}
    row = stats["proj"]["fprop"]
    assert row["recipe"] == label and row["backend"] == "emulated"
    assert row["rht"] == (str(rht_size) if rht_size else "off")
    assert row["ran"] == {"x": f"{make_format(x_fmt).describe()} rtne",
                          "w": f"{make_format(w_fmt, block_2d=w_2d or None).describe()} rtne"}
    assert stats["proj"]["dgrad"]["ran"]["dy"].endswith(" sr")  # every preset rounds dY stochastically
    rht = RHT(rht_size, 0) if rht_size else None  # the recipe's RHT: rht_seed 0
    if rht is not None:
        assert lin.gemms.rht == rht
    for role, t, fmt, two_d in (("x", x.detach().reshape(-1, 64), x_fmt, False), ("w", lin.weight.detach(), w_fmt,
                                                                                  w_2d)):
        want = _reference_stats(t, fmt, two_d, rht, grid_max)
        got = row[role]
        n = t.numel()
        # the same fp32 operands in both: products and differences of two fp32 numbers are exact in float64, so
        # the only difference is the summation order of n terms of one sign (or nearly): relative <= n u64 per
        # sum, two sums per ratio
        rel = 2 * n * U64
        assert got["amax"] == want["amax"]  # a max is exact
        assert got["alpha"] == pytest.approx(want["alpha"], rel=rel)
        assert got["nmse"] == pytest.approx(want["nmse"], rel=rel)
        # dB = 10 log10(1/nmse): d(dB) = (10 / ln 10) d(nmse) / nmse, plus the log's own rounding
        assert got["sqnr_db"] == pytest.approx(10 * math.log10(1 / want["nmse"]), abs=4.35 * rel + 1e-13)
        # fractions: exact counts over n, the code's mean taken in fp32 (one fp32 rounding)
        assert got["saturated"] == pytest.approx(want["saturated"], rel=U32, abs=0)
        assert got["zeroed"] == pytest.approx(want["zeroed"], rel=U32, abs=0)
        assert 0 < want["nmse"] < 0.1 and want["zeroed"] > 0  # the data exercised what is checked
    if x_fmt in ("nvfp4", "mxfp4"):  # rounded (E4M3 / power-of-two) scales leave the block amax above the grid
        assert row["x"]["saturated"] > 0
    else:  # exact fp32 scales put each block's amax on the grid's largest point: nothing clips
        assert row["x"]["saturated"] == 0
    assert quant_stats(model) == {}  # consumed
    set_quant_stats(model, False)
    model(x).mul(probe).sum().backward()
    assert quant_stats(model) == {}
    assert lin.telemetry()["fprop"]["calls"] == 3


def test_negative_interval_is_a_one_line_config_error(tiny_cfg, tiny_overrides, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        tiny_cfg("tiny_dense", tmp_path / "run", "logging.quant_stats_interval=-1")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("logging.quant_stats_interval") and "-1" in msg
    from megatron_ufp4 import train
    overrides = tiny_overrides("tiny_dense", tmp_path / "run", "logging.quant_stats_interval=-1")
    assert train.main([str(CONFIGS / "tiny_dense.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "logging.quant_stats_interval" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was created


def _plot_metrics():
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO_ROOT / "tools" / "plot_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_metrics(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tool = _plot_metrics()
    with_stats, without = runs("ufp4", 2)["run_dir"], runs("ufp4", 0)["run_dir"]
    a, b = tmp_path / "loss.png", tmp_path / "quant.png"
    assert tool.main([str(with_stats), str(without), "--out", str(a), "--heatmap", str(b)]) == 0
    for p in (a, b):
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG
    # the heatmap's numbers: the last statistics step's, per module and operand
    recs = read_metrics(with_stats)
    step, names, mats = tool.quant_table(recs, None)
    last = [r for r in recs if r.get("quant")][-1]
    assert step == 4 == last["step"] and names == list(last["quant"])
    for i, name in enumerate(names):
        for j, (gemm, role) in enumerate(tool.OPERANDS):
            for stat in ("sqnr_db", "alpha"):
                assert mats[stat][i][j] == last["quant"][name][gemm][role][stat]
    assert tool.quant_table(recs, 2)[0] == 2
    capsys.readouterr()
    # --step without statistics, a run without statistics, nothing to draw: exit 2, one line
    for argv, words in (([str(with_stats), "--heatmap", str(tmp_path / "c.png"), "--step", "3"], "--step 3"),
                        ([str(without), "--heatmap", str(tmp_path / "d.png")], "quant_stats_interval"),
                        ([str(with_stats)], "--out")):
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "d.png").exists()
    assert tool.main([str(tmp_path), "--out", str(tmp_path / "e.png")]) == 2  # not a run directory
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("position", [(5, 1), None], ids=["training", "no_position"])
@pytest.mark.parametrize("recipe", ["ufp4", "nvfp4"])
def test_grouped_experts_report_the_loops_statistics(tiny_cfg, tmp_path, monkeypatch, recipe, position):
    """A telemetry step of an MoE layer runs its experts grouped, and reports for every expert the
    per-operand statistics and GEMM log the per-expert loop reports; the values it trains with are
    the loop's, and those of a step without statistics (also where SR keys come from each layer's
    generator, outside a training position: drawn once, as the loop draws them)."""
    from megatron_ufp4.linear import ExpertLinear, expert_linear
    from megatron_ufp4.linear.telemetry import gemm_states
    from megatron_ufp4.parallel.build import build_model

    cfg = tiny_cfg("tiny_moe", tmp_path, f"recipe.name={recipe}", "model.num_experts=4", "model.moe_top_k=2",
                   "model.moe_ffn_hidden_size=64")
    g = torch.Generator().manual_seed(3)
    tokens, labels = (torch.randint(0, cfg.model.vocab_size, (2, 32), generator=g) for _ in range(2))

    real, groupable = expert_linear.grouped_linear, ExpertLinear.groupable

    def step(group: bool, stats_on: bool = True):
        calls = []
        # not grouped: every MoE layer runs its reference loop (GroupedExperts.forward_loop)
        monkeypatch.setattr(ExpertLinear, "groupable", groupable if group else (lambda self: False))
        monkeypatch.setattr(expert_linear, "grouped_linear", lambda *a: calls.append(1) or real(*a))
        torch.manual_seed(0)
        model, = build_model(cfg)
        model.train()
        set_quant_stats([model], stats_on)
        model.step_context.at(*position) if position else model.step_context.at(None)
        loss = model(tokens, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        logs = {n: {g: e["calls"] for g, e in gemms.log.items()} for name, m in model.named_modules()
                if isinstance(m, (QuantizedLinear, ExpertLinear)) and m.quantized
                for n, gemms in gemm_states(name, m)}  # a routed expert under its own name
        return loss.detach(), grads, quant_stats([model]), logs, len(calls)

    loss, grads, stats, logs, grouped_calls = step(group=True)
    ref_loss, ref_grads, ref_stats, ref_logs, loop_calls = step(group=False)
    off_loss, off_grads, _, _, _ = step(group=True, stats_on=False)
    assert grouped_calls > 0 and loop_calls == 0
    for other_loss, other_grads in ((ref_loss, ref_grads), (off_loss, off_grads)):
        assert torch.equal(loss, other_loss) and all(torch.equal(grads[n], other_grads[n]) for n in other_grads)
    experts = {f"layers.{i}.mlp.experts.{e}.{p}" for i in range(cfg.model.first_k_dense, cfg.model.num_layers)
               for e in range(4) for p in ("gate_up", "down")}
    assert experts <= set(ref_stats) and experts <= set(ref_logs)  # every routed expert, per expert
    assert stats == ref_stats and logs == ref_logs
