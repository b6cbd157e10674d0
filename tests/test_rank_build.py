"""Each rank's model, built as the distributed trainer builds it (meta device, only its own
TP/PP/EP share materialised), equals the matching slices of the single-process model."""
import pytest
import torch

from megatron_ufp4.linear.expert_linear import stacked_name
from megatron_ufp4.model import GPTModel, LinearFactory, ModelConfig
from megatron_ufp4.model.expert_keys import unstack_experts
from megatron_ufp4.model.placement import named_placements
from megatron_ufp4.parallel.build import build_rank_chunks
from megatron_ufp4.parallel.parallel_factory import ParallelLinearFactory
from megatron_ufp4.parallel.state import state_for_rank
from tp_reference import shard_state_dict

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
    full_model = GPTModel(cfg, LinearFactory(recipe, cfg.num_layers), init_seed=SEED)
    full = full_model.state_dict()
    world = layout["tp"] * layout["pp"] * layout["dp"]
    covered = set()  # checkpoint keys (stacked experts one key per expert) held by some rank
    for rank in range(world):
        st = state_for_rank(rank, world, layout["tp"], layout["pp"], layout["dp"], layout.get("ep", 1),
                            layout.get("vpp", 1), model_cfg=cfg)
        chunks = build_rank_chunks(cfg, ParallelLinearFactory(recipe, cfg.num_layers, st), st, init_seed=SEED,
                                   device="cpu")
        assert len(chunks) == st.vpp
        for chunk in chunks:
            assert not any(t.is_meta for t in [*chunk.parameters(), *chunk.buffers()])
            expected = shard_state_dict(full, chunk, st)  # slices by the (re-derived) TP attributes
            sd = chunk.state_dict()
            for k, v in sd.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, expected[k]), (rank, k)
            covered |= {k for k, v in unstack_experts(sd, named_placements(chunk)).items() if torch.is_tensor(v)}
        # the placements optimizer, norm and checkpoint code read survive materialisation
        assert any(p.split for c in chunks for p in named_placements(c).values())
    # every tensor held somewhere, every routed expert of every layer included
    assert covered == {k for k, v in unstack_experts(full, named_placements(full_model)).items() if torch.is_tensor(v)}


@pytest.mark.slow
def test_moe_124b_structure_at_tiny_width():
    """The paper's 124B layer/expert structure (42 layers, first 2 dense, 512 experts top-8 +
    1 shared, sigmoid group-limited router, an MTP module) at tiny width, in its TP2·PP4·EP32·DP32 layout with uneven
    first/last stages: rank 0 (embedding, the dense layers) and the last rank (head, other
    TP rank, last EP rank) hold the single-process values at their global names."""
    from megatron_ufp4.model.config import preset
    cfg = preset("moe-124b", vocab_size=128, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                 moe_ffn_hidden_size=32, max_seq_len=16)  # widths: multiples of 16-blocks per TP shard
    assert (cfg.num_layers, cfg.num_experts, cfg.first_k_dense, cfg.moe_top_k) == (42, 512, 2, 8)
    recipe, tp, pp, dp, ep = "ufp4", 2, 4, 32, 32
    world = tp * pp * dp
    full = GPTModel(cfg, LinearFactory(recipe, cfg.num_layers), init_seed=SEED).state_dict()
    stages = {0: range(0, 10), 3: range(34, 42)}  # first 10 and last 8 layers (12 in each middle stage)
    for rank in (0, world - 1):  # (tp0, dp0, pp0) and (tp1, dp31, pp3)
        st = state_for_rank(rank, world, tp, pp, dp, ep, model_cfg=cfg)
        chunk, = build_rank_chunks(cfg, ParallelLinearFactory(recipe, cfg.num_layers, st), st, init_seed=SEED,
                                   device="cpu", first_stage_layers=10, last_stage_layers=8)
        sd = chunk.state_dict()
        layers = {int(k.split(".")[1]) for k in sd if k.startswith("layers.")}
        assert layers == set(stages[st.pp_rank]), rank
        # the experts held, at their global indices: the stacked parameters' placements, each MoE
        # layer's ``experts.indices`` and the per-expert checkpoint keys agree
        placements = named_placements(chunk)
        held = {n: p.experts for n, p in placements.items() if p.experts is not None}
        mine = tuple(range(st.ep_rank * 16, (st.ep_rank + 1) * 16))  # 512 / EP32 per rank
        assert held and set(held.values()) == {mine}, rank
        assert all(moe.experts.indices == mine and len(moe.experts) == 16 for moe in chunk.moe_layers()), rank
        per_expert = [stacked_name(k) for k in unstack_experts(sd, placements)]
        experts = {e for n, e in filter(None, per_expert) if n.startswith("layers.")}
        assert experts == set(mine), rank
        mtp_experts = {e for n, e in filter(None, per_expert) if n.startswith("mtp.0.block.mlp.experts.")}
        assert mtp_experts == (experts if st.pp_rank == pp - 1 else set()), rank  # the MTP block: last stage
        # the embedding: first stage, and a copy on the last for MTP's token embedding
        assert ("embed.weight" in sd) == (st.pp_rank in (0, pp - 1)) and ("head.weight" in sd) == (st.pp_rank == pp - 1)
        expected = shard_state_dict(full, chunk, st)
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, expected[k]), (rank, k)
