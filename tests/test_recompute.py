"""Activation recomputation is exact: with selective or full recomputation the loss and every
gradient are bitwise those of no recomputation, for every preset recipe (and a recipe that rounds
a forward operand stochastically), dense and MoE with MTP, and nothing is counted twice.

The reference is the same model without recomputation, at the same weights and batch.  The
recomputed forward must quantize exactly as the first one did: equal bits are the criterion,
no tolerance.
"""
import pytest
import torch

from megatron_ufp4.fp4.recipes import PRESETS
from megatron_ufp4.linear.quantized_linear import QuantizedLinear
from megatron_ufp4.parallel.build import build_model
from megatron_ufp4.training.recompute import apply_recompute

pytestmark = pytest.mark.numerical

MOE_MTP = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=64", "model.first_k_dense=1",
           "model.mtp_depth=1"]
MODES = [("selective", "uniform", 1), ("full", "uniform", 1), ("full", "block", 1)]


def _grads(cfg, mode, tokens, labels, step=3, micro=1):
    """Loss, every parameter's gradient, the GEMM telemetry and MoE load counts of one
    forward/backward at (step, micro-batch), with ``mode`` = (granularity, method, layers) or None."""
    torch.manual_seed(0)
    model, = build_model(cfg)
    if mode is not None:
        assert apply_recompute([model], *mode) > 0
    model.train()
    model.step_context.at(step, micro)
    loss = model(tokens, labels)
    model.step_context.at(step, micro + 1)  # the live context moves on before backward, as in a pipeline
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    calls = {n: {g: e["calls"] for g, e in m.gemms.log.items()} for n, m in model.named_modules()
             if isinstance(m, QuantizedLinear) and m.quantized}
    loads = {n: b.clone() for n, b in model.named_buffers() if n.endswith("load_accum")}
    return loss.detach(), grads, calls, loads


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe_mtp"])
@pytest.mark.parametrize("recipe", [*sorted(PRESETS), "ufp4_sr_x"])
def test_recomputation_is_bitwise(tiny_cfg, tmp_path, recipe, moe):
    extra = ["recipe.name=ufp4", "recipe.sr=[x, dy]"] if recipe == "ufp4_sr_x" else [f"recipe.name={recipe}"]
    cfg = tiny_cfg("tiny_moe" if moe else "tiny_dense", tmp_path, *extra, *(MOE_MTP if moe else []))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=g)
    ref_loss, ref_grads, ref_calls, ref_loads = _grads(cfg, None, tokens, labels)
    assert ref_grads and (not moe or ref_loads)
    for mode in MODES:
        loss, grads, calls, loads = _grads(cfg, mode, tokens, labels)
        assert torch.equal(loss, ref_loss), mode
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            assert torch.equal(grads[n], ref_grads[n]), (mode, n)
        assert calls == ref_calls, mode  # the recomputed forward's GEMMs are not logged twice
        assert all(torch.equal(loads[n], ref_loads[n]) for n in loads), mode  # nor MoE loads counted twice


# -- the parallel layouts -------------------------------------------------------------------------------
LAYOUT_MODEL = {"model.num_layers": 4, "model.hidden_size": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
                "model.ffn_hidden_size": 128, "model.max_seq_len": 32, "model.vocab_size": 512, "data.seq_len": 32,
                "training.micro_batch_size": 2, "training.global_batch_size": 8, "training.train_steps": 2,
                "training.eval_interval": 0, "logging.interval": 100, "checkpoint.interval": 0,
                "recipe.name": "ufp4", "recipe.sr": "[x, dy]"}
LAYOUT_MOE = {"model.num_experts": 4, "model.moe_top_k": 2, "model.moe_ffn_hidden_size": 64,
              "model.first_k_dense": 1, "model.mtp_depth": 1,
              "model.expert_bias_rate": 0.01}  # loads counted twice would move the expert bias otherwise
LAYOUTS = {
    "tp2sp": (2, {"parallel.tensor": 2, "parallel.sequence_parallel": True}),
    "pp2_1f1b": (2, {"parallel.pipeline": 2}),
    "pp2_gpipe": (2, {"parallel.pipeline": 2, "parallel.pipeline_schedule": "gpipe"}),
    "pp2_vpp2": (2, {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2,
                     "parallel.pipeline_schedule": "interleaved_1f1b"}),
    "ep2_moe_mtp": (2, {"parallel.expert": 2, **LAYOUT_MOE}),
    # one micro-batch per rank: the gradient all-reduce overlaps backward, beside the aux loss's load
    # all-reduce that the recomputed MoE forward issues again on the same data-parallel group
    "dp2_moe_overlap": (2, {"parallel.data": 2, "training.global_batch_size": 4, "model.aux_loss_coeff": 0.01,
                            **LAYOUT_MOE}),
}


def _train_each_mode(rank, world, prefix, run_dir, extra):
    """Two steps of each recomputation mode from the same init on this rank: the losses and
    gradient norms, and this rank's parameters after the steps (AdamW moved them by the gradients)."""
    from conftest import quiet
    from megatron_ufp4.config import load_config
    from megatron_ufp4.training.trainer import Trainer
    out = {}
    for granularity, method, layers in [("none", "uniform", 1), *MODES]:
        over = {**LAYOUT_MODEL, "data.prefix": prefix, "training.run_dir": f"{run_dir}/{granularity}-{method}",
                "training.recompute_granularity": granularity, "training.recompute_method": method,
                "training.recompute_num_layers": layers, **extra}
        trainer = Trainer(load_config("configs/tiny_dense.yaml", [f"{k}={v}" for k, v in over.items()]),
                          console=quiet)
        try:
            recs = [trainer.train_step() for _ in range(2)]
            params = {f"{i}.{n}": p.detach().clone() for i, s in enumerate(trainer.stages)
                      for n, p in s.named_parameters()}
        finally:
            trainer.close()
        out[granularity, method] = ([r["loss"] for r in recs], [r["grad_norm"] for r in recs], params)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_recomputation_is_bitwise_on_every_layout(shakespeare_prefix, tmp_path, layout):
    """Under TP2+SP, PP2 (1F1B, GPipe, interleaved with two virtual stages), EP2 with MoE and MTP, and
    DP2 with MoE and the aux loss with backward-overlapped gradient all-reduce, a ufp4 recipe that
    also rounds x stochastically: each rank's losses, gradient norms and parameters after two
    AdamW steps are bitwise those of no recomputation."""
    from dist_utils import run_ranks
    world, extra = LAYOUTS[layout]
    for out in run_ranks(world, _train_each_mode, shakespeare_prefix, str(tmp_path), extra):
        ref_loss, ref_norm, ref_params = out["none", "uniform"]
        for mode in MODES:
            loss, norm, params = out[mode[:2]]
            assert loss == ref_loss and norm == ref_norm, (mode, loss, ref_loss)
            assert all(torch.equal(params[n], ref_params[n]) for n in ref_params), mode


def test_a_forward_without_training_position_is_refused(tiny_cfg, tmp_path):
    """Outside a training position SR keys come from each layer's generator and could not be drawn
    again in the recomputation: one clear error instead of different gradients."""
    cfg = tiny_cfg("tiny_dense", tmp_path, "recipe.name=ufp4")
    model, = build_model(cfg)
    apply_recompute([model], "full")
    model.step_context.at(None)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="needs the training position"):
        model(tokens, tokens)
    with torch.no_grad():  # evaluation keeps nothing for backward: allowed
        model(tokens, tokens)
