"""CUDA: training on the device (exact resume, the loss going down).  Shared setup: cuda_common.py."""
from __future__ import annotations

import math

import pytest
import torch

try:  # tests/ as a package (with __init__.py) or as a plain directory on sys.path
    from .conftest import assert_state_equal, quiet, read_metrics, snapshot
except ImportError:
    from conftest import assert_state_equal, quiet, read_metrics, snapshot
from cuda_common import CUDA_MARKS, device_name_under_test, device_under_test
from cuda_common import ieee_fp32_matmul  # noqa: F401 (autouse fixtures)

pytestmark = CUDA_MARKS


# -- 4. training on the device ------------------------------------------------------------------
@pytest.fixture
def deterministic():
    """Deterministic kernels where torch has them (index_add_, scatter); warn_only so an op
    without one warns instead of failing, and a remaining difference shows in the losses.
    Attention runs SDPA's math backend: fp32 inputs would otherwise take the memory-efficient
    kernel, whose backward accumulates with atomics and stays non-deterministic (torch only
    warns under warn_only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


RESUME = ["recipe.name=ufp4", "training.train_steps=4", "training.eval_interval=2", "checkpoint.interval=0",
          "optimizer.lr=3e-3", "schedule.warmup_steps=1"]
EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "skipped", "skipped_total", "val_loss", "val_ppl", "moe")


@pytest.mark.parametrize("config", ["tiny_dense", "tiny_moe"])
def test_exact_resume_on_device(config, tiny_cfg, tmp_path, deterministic):
    """4 steps uninterrupted == 2 steps + checkpoint + resume for 2, bit for bit (UFP4, SR on dY)."""
    from megatron_ufp4.training.trainer import Trainer

    dev = f"training.device={device_name_under_test()}"
    ref = Trainer(tiny_cfg(config, tmp_path / "ref", *RESUME, dev), console=quiet)
    assert next(ref.model.parameters()).device.type == device_under_test().type
    ref_result = ref.train()
    ref_model = snapshot(ref.model.state_dict())
    ref.close()

    first = Trainer(tiny_cfg(config, tmp_path / "resumed", *RESUME, dev), console=quiet)
    assert first.train(exit_after=2)["step"] == 2
    first.close()
    del first
    logs: list[str] = []
    second = Trainer(tiny_cfg(config, tmp_path / "resumed", *RESUME, dev), console=logs.append)
    assert second.step == 2 and any("resumed" in line for line in logs)
    result = second.train()
    second.close()

    want, got = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert len({r["loss"] for r in want}) == 4  # the model really changes from step to step
    for g, w in zip(got, want):
        assert {k: g.get(k) for k in EXACT_KEYS} == {k: w.get(k) for k in EXACT_KEYS}, f"step {w['step']}"
    assert {k: result.get(k) for k in EXACT_KEYS} == {k: ref_result.get(k) for k in EXACT_KEYS}
    assert_state_equal(snapshot(second.model.state_dict()), ref_model, "model")


@pytest.mark.parametrize("recipe,dtype", [("bf16", "fp32"), ("ufp4", "fp32"), ("ufp4", "bf16")])
@pytest.mark.parametrize("config", ["tiny_dense", "tiny_moe"])
def test_training_on_device_lowers_the_loss(config, recipe, dtype, tiny_cfg, tmp_path):
    from megatron_ufp4.training.trainer import Trainer

    steps = 30
    cfg = tiny_cfg(config, tmp_path, f"recipe.name={recipe}", f"training.dtype={dtype}",
                   f"training.train_steps={steps}", f"training.device={device_name_under_test()}", "optimizer.lr=3e-3",
                   "schedule.kind=cosine", "schedule.warmup_steps=4", "training.eval_interval=0",
                   "checkpoint.interval=0", "checkpoint.save_final=false")
    trainer = Trainer(cfg, console=quiet)
    assert trainer.device.type == device_under_test().type
    assert all(p.device.type == device_under_test().type for p in trainer.model.parameters())
    records = [trainer.train_step() for _ in range(steps)]
    trainer.close()
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses) and not any(r["skipped"] for r in records), losses
    assert losses[0] == pytest.approx(math.log(512), abs=0.3), losses[0]  # uniform over the vocabulary
    last = sum(losses[-5:]) / 5
    assert last < losses[0] - 0.5, (losses[0], last)
