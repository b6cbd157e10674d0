"""Each rank's model, built as the distributed trainer builds it (meta device, only its own
TP/PP/EP share materialised), equals the matching slices of the single-process model."""
import pytest
import torch

from megatron_ufp4.model import GPTModel, LinearFactory, ModelConfig
from megatron_ufp4.parallel.build import build_rank_chunks
from megatron_ufp4.parallel.parallel_factory import ParallelLinearFactory, shard_state_dict
from megatron_ufp4.parallel.state import state_for_rank

BASE = dict(vocab_size=128, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
            max_seq_len=16)
MOE = dict(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, num_shared_experts=1, first_k_dense=1, bias=True)
SEED = 17


@pytest.mark.parametrize("model_kw,layout", [
    ({}, dict(tp=2, pp=2, dp=1)),
    ({"tie_embeddings": True}, dict(tp=2, pp=2, dp=1, vpp=2)),
    ({**MOE}, dict(tp=1, pp=1, dp=2, ep=2)),
    ({**MOE}, dict(tp=2, pp=2, dp=2, ep=2)),
], ids=["tp2pp2", "tp2pp2_vpp2_tied", "ep2", "tp2pp2ep2"])
def test_every_rank_holds_the_single_process_values(model_kw, layout):
    cfg = ModelConfig(**{**BASE, **model_kw})
    recipe = "ufp4"
    full = GPTModel(cfg, LinearFactory(recipe, cfg.num_layers), init_seed=SEED).state_dict()
    world = layout["tp"] * layout["pp"] * layout["dp"]
    covered = set()
    for rank in range(world):
        st = state_for_rank(rank, world, layout["tp"], layout["pp"], layout["dp"], layout.get("ep", 1),
                            layout.get("vpp", 1), model_cfg=cfg)
        chunks = build_rank_chunks(cfg, ParallelLinearFactory(recipe, cfg.num_layers, st), st, init_seed=SEED,
                                   device="cpu")
        assert len(chunks) == st.vpp
        for chunk in chunks:
            assert not any(t.is_meta for t in [*chunk.parameters(), *chunk.buffers()])
            expected = shard_state_dict(full, chunk, st)  # slices by the (re-derived) TP attributes
            for k, v in chunk.state_dict().items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, expected[k]), (rank, k)
                    covered.add(k)
        # the TP attributes optimizer, norm and checkpoint code read survive materialisation
        assert any(getattr(p, "tensor_parallel", False) for c in chunks for p in c.parameters())
    assert covered == {k for k, v in full.items() if isinstance(v, torch.Tensor)}  # every tensor held somewhere
