"""Tensor-parallel layers built in one process: sharding checks and their one-line refusals,
the factory's single-process seeds, strided shard round trips, and a TP=1 parallel model equal
to the plain one (the multi-rank comparisons are in test_tensor_parallel.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ufp4.linear import QuantizedLinear
from megatron_ufp4.model import GPTModel, LinearFactory, ModelConfig
from megatron_ufp4.model.placement import Placement, placement_of
from megatron_ufp4.parallel.parallel_factory import (ParallelLinearFactory, attach_placements,
                                                     build_tensor_parallel_gpt, shard_tensor)
from megatron_ufp4.parallel.state import ParallelState, build_parallel_state
from megatron_ufp4.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_ufp4.parallel.vocab_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from tp_reference import unshard_tensor
from test_tensor_parallel import CFG, _diff

pytestmark = pytest.mark.numerical


def _fake_state(tp=2, rank=1, sp=False) -> ParallelState:
    return ParallelState(world_size=tp, tp=tp, tp_rank=rank, sequence_parallel=sp)


@pytest.mark.parametrize("build,match", [
    (lambda st: ColumnParallelLinear(64, 65, recipe="bf16", state=st), "not divisible by TP"),
    (lambda st: ColumnParallelLinear(64, 96, recipe="mxfp4", state=st), "multiple of 32"),
    (lambda st: ColumnParallelLinear(64, 48, recipe="ufp4", state=st),
     "shard of 24 output rows must be a multiple of 16"),
    (lambda st: ColumnParallelLinear(64, 96, recipe="ufp4", state=st, partition_stride=2), "part shard of 24"),
    (lambda st: RowParallelLinear(48, 64, recipe="ufp4", state=st), "shard of 24 input columns"),
    (lambda st: RowParallelLinear(63, 64, recipe="bf16", state=st), "in_features=63 is not divisible"),
    (lambda st: VocabParallelEmbedding(127, 8, state=st), "not divisible by TP=2"),
    (lambda st: ParallelLinearFactory("ufp4", 2, _fake_state(sp=True))(64, 128, kind="column", layer_index=1,
                                                                       name="mlp.experts.0.gate_up", in_moe=True),
     "layers.1.mlp.experts.0.gate_up: sequence parallelism does not support MoE"),
    (lambda st: ParallelLinearFactory("ufp4", 2, st)(64, 128, kind="diagonal", layer_index=0, name="x"), "kind"),
])
def test_sharding_validation_errors(build, match):
    with pytest.raises(ValueError, match=match) as e:
        build(_fake_state())
    assert "\n" not in str(e.value)


def test_high_precision_layers_accept_unaligned_shards_and_placements_are_declared():
    st = _fake_state()
    col = ColumnParallelLinear(64, 100, recipe="bf16", state=st, partition_stride=2)
    assert col.weight.shape == (50, 64)
    assert placement_of(col, "weight") == Placement((100, 64), dim=0, parts=2, num_shards=2, shard=st.tp_rank)
    sp = _fake_state(sp=True)
    row = RowParallelLinear(64, 64, recipe="ufp4", state=sp)
    assert row.weight.shape == (64, 32) and placement_of(row, "weight").dim == 1
    assert not placement_of(row, "bias").split  # whole on every rank
    attach_placements(row, sp)  # what the model build does: under SP the bias's gradient is a partial sum
    assert placement_of(row, "bias").partial_grad and not placement_of(row, "weight").partial_grad


def test_factory_builds_parallel_layers_with_single_process_seeds():
    st = _fake_state(rank=0)
    f = ParallelLinearFactory("ufp4", 2, st, seed=9)
    ref = LinearFactory("ufp4", 2, seed=9)
    gate_up = f(64, 256, kind="column", layer_index=1, name="mlp.gate_up", parts=2)  # declared, not read from the name
    qkv = f(64, 128, kind="column", layer_index=1, name="attn.qkv", bias=True)
    down = f(128, 64, kind="row", layer_index=1, name="mlp.down")
    assert isinstance(gate_up, ColumnParallelLinear) and gate_up.partition_stride == 2 and qkv.partition_stride == 1
    assert isinstance(down, RowParallelLinear) and down.weight.shape == (64, 64)
    assert placement_of(qkv, "bias").split and placement_of(qkv, "bias").dim == 0
    assert gate_up.gemms.generator.initial_seed() == ref.sr_seed(1, "mlp.gate_up")
    assert isinstance(gate_up, QuantizedLinear) and gate_up.telemetry() == {}


def test_strided_shard_round_trip():
    full = torch.arange(24.0).view(8, 3)
    shards = [shard_tensor(full, 0, 2, 2, r) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0, 3, 12, 15]  # [gate rows 0-1; up rows 4-5]
    assert torch.equal(unshard_tensor(shards, 0, 2), full)


def test_tp1_parallel_model_equals_single_process(single_thread):
    """ParallelLinearFactory at TP=1 is the single-process model (no split, no collectives)."""
    st = build_parallel_state()
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    full = GPTModel(cfg, LinearFactory("ufp4", 2, seed=3))
    torch.manual_seed(0)
    model = build_tensor_parallel_gpt(cfg, ParallelLinearFactory("ufp4", 2, st, seed=3))
    tokens, labels = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    a = F.cross_entropy(full(tokens).flatten(0, 1), labels.flatten())
    b = vocab_parallel_cross_entropy(model(tokens), labels)
    assert abs(a.item() - b.item()) <= 1e-6
    a.backward()
    b.backward()
    for (name, p), q in zip(full.named_parameters(), model.parameters()):
        assert _diff(q.grad, p.grad) <= 1e-6 * float(p.grad.abs().max()) + 1e-9, name
