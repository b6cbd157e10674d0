"""The multi-process trainer against the single-process one, on gloo ranks.

Tolerances: with the bf16 recipe in fp32 the layouts differ from one process only in the
order of FP32 sums (tensor-parallel partial products, data-parallel gradient averaging),
so losses agree to ~1e-6 relative; AdamW's first steps (~lr * sign(g)) can amplify a
last-bit difference on a near-zero gradient, so 4 steps are checked at 1e-4.  ufp4 adds
4-bit rounding on top: a flipped rounding moves a value by a whole FP4 step, so the
bound is 1e-3.  SR keys derive from (module seed, step, global micro-batch), so TP, PP and
DP layouts draw the noise a single process draws; expert parallelism regroups tokens of
several ranks' micro-batches inside one expert GEMM, so its ufp4 bound is 2e-2.
"""
import copy
import math

import pytest
import torch

from dist_utils import run_ranks

TINY = {"model.num_layers": 4, "model.hidden_size": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.ffn_hidden_size": 128, "model.max_seq_len": 64, "model.vocab_size": 512, "data.seq_len": 64,
        "training.micro_batch_size": 2, "training.global_batch_size": 8, "training.train_steps": 4,
        "training.eval_interval": 4, "training.eval_iters": 4, "logging.interval": 100, "checkpoint.interval": 0,
        "optimizer.lr": 1e-3, "schedule.warmup_steps": 2}
MOE = {"model.num_experts": 4, "model.moe_top_k": 2, "model.moe_ffn_hidden_size": 64, "model.first_k_dense": 1}


def _cfg(prefix, run_dir, extra):
    from megatron_ufp4.config import load_config
    over = {**TINY, "data.prefix": prefix, "training.run_dir": str(run_dir), **extra}
    return load_config("configs/tiny_dense.yaml", [f"{k}={v}" for k, v in over.items()])


def _train_ranks(rank, world, prefix, run_dir, extra, exit_after):
    torch.set_num_threads(1)
    from megatron_ufp4.training.distributed import DistributedTrainer
    trainer = DistributedTrainer(_cfg(prefix, run_dir, extra), console=lambda *a: None)
    records = []
    while trainer.step < trainer.cfg.training.train_steps:
        records.append(trainer.train_step())
        if exit_after and trainer.step >= exit_after:
            trainer.save()
            break
    val = trainer.evaluate()
    return [r["loss"] for r in records], [r["grad_norm"] for r in records], val


def _single(prefix, run_dir, extra):
    from megatron_ufp4.training.trainer import Trainer
    extra = {k: v for k, v in extra.items() if not k.startswith("parallel.")}
    t = Trainer(_cfg(prefix, run_dir, extra), console=lambda *a: None)
    recs = [t.train_step() for _ in range(t.cfg.training.train_steps)]
    return [r["loss"] for r in recs], [r["grad_norm"] for r in recs], t.evaluate()


def _close(a, b, rel):
    return all(math.isclose(x, y, rel_tol=rel, abs_tol=0) for x, y in zip(a, b))


LAYOUTS = [
    # (world, overrides, recipe, tolerance)
    (4, {"parallel.tensor": 2, "parallel.pipeline": 2}, "bf16", 1e-4),
    (4, {"parallel.tensor": 2, "parallel.pipeline": 2}, "ufp4", 1e-3),
    (2, {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2, "parallel.pipeline_schedule": "interleaved_1f1b"},
     "ufp4", 1e-3),
    (2, {"parallel.tensor": 2, "parallel.sequence_parallel": True}, "ufp4", 1e-3),
    (2, {"parallel.data": 2}, "bf16", 1e-4),
    (2, {"parallel.data": 2}, "ufp4", 1e-3),
    (4, {**MOE, "parallel.tensor": 2, "parallel.data": 2, "parallel.expert": 2}, "bf16", 1e-4),
    (4, {**MOE, "parallel.tensor": 2, "parallel.data": 2, "parallel.expert": 2}, "ufp4", 2e-2),
]


@pytest.mark.slow
@pytest.mark.parametrize("world,extra,recipe,tol", LAYOUTS,
                         ids=["tp2pp2-bf16", "tp2pp2-ufp4", "pp2vpp2-ufp4", "tp2sp-ufp4", "dp2-bf16", "dp2-ufp4",
                              "ep2tp2-moe-bf16", "ep2tp2-moe-ufp4"])
def test_layout_matches_single_process(shakespeare_prefix, tmp_path, world, extra, recipe, tol):
    extra = {**extra, "recipe.name": recipe}
    ref_loss, ref_norm, ref_val = _single(shakespeare_prefix, tmp_path / "single", extra)
    (loss, norm, val), *_ = run_ranks(world, _train_ranks, shakespeare_prefix, tmp_path / "dist", extra, None)
    assert _close(loss, ref_loss, tol), (loss, ref_loss)
    # gradient norms see FP4 rounding of dY directly: one flipped rounding moves them by ~1%
    assert _close(norm, ref_norm, 1e-3 if recipe == "bf16" else 5e-2), (norm, ref_norm)
    assert math.isclose(val, ref_val, rel_tol=tol * 2), (val, ref_val)
    assert loss[-1] < loss[0]


@pytest.mark.slow
def test_multi_rank_resume_is_exact_and_reshards(shakespeare_prefix, tmp_path):
    """Stop a TP2xPP2 ufp4 run after step 2; resuming on the same layout reproduces the
    uninterrupted run bit for bit, and the same checkpoint loads into TP1xPP4 and DP2xTP2."""
    layout = {"parallel.tensor": 2, "parallel.pipeline": 2, "recipe.name": "ufp4"}
    (full, _, full_val), *_ = run_ranks(4, _train_ranks, shakespeare_prefix, tmp_path / "full", layout, None)
    run = tmp_path / "stopped"
    run_ranks(4, _train_ranks, shakespeare_prefix, run, layout, 2)
    saved = copy.deepcopy(sorted(p.name for p in (run / "checkpoints").iterdir()))
    assert saved == ["step_00000002"]
    (tail, _, val), *_ = run_ranks(4, _train_ranks, shakespeare_prefix, run, layout, None)
    assert tail == full[2:] and val == full_val
    other = {"parallel.tensor": 1, "parallel.pipeline": 4, "recipe.name": "ufp4",
             "training.resume": str(run / "checkpoints" / "step_00000002")}
    (tail2, _, _), *_ = run_ranks(4, _train_ranks, shakespeare_prefix, tmp_path / "resharded", other, None)
    assert _close(tail2, full[2:], 1e-3)


def _bad_layout(rank, world, prefix, run_dir, extra):
    from megatron_ufp4.training.distributed import DistributedTrainer
    try:
        DistributedTrainer(_cfg(prefix, run_dir, extra), console=lambda *a: None)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_invalid_layout_is_refused_with_one_line(shakespeare_prefix, tmp_path):
    msgs = run_ranks(2, _bad_layout, shakespeare_prefix, tmp_path, {"parallel.tensor": 2, "parallel.pipeline": 2})
    assert all(m and "world size" in m and "\n" not in m for m in msgs)
