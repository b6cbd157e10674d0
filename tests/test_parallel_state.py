"""Process-group layout and validation."""
import pytest

from megatron_ufp4.model import ModelConfig
from megatron_ufp4.parallel import build_parallel_state, validate_layout

from dist_utils import run_ranks


def _groups(rank, world, tp, pp, ep):
    st = build_parallel_state(tp=tp, pp=pp, ep=ep)
    return {k: v for k, v in st.ranks.items()}, (st.tp_rank, st.dp_rank, st.pp_rank, st.ep_rank, st.edp_rank)


@pytest.mark.slow
def test_eight_rank_layout_matches_the_documented_example():
    out = run_ranks(8, _groups, 2, 2, 2)
    ranks, coords = out[5]
    assert ranks["tp"] == [4, 5] and ranks["dp"] == [5, 7] and ranks["pp"] == [1, 5]
    assert ranks["ep"] == [5, 7] and ranks["edp"] == [5]
    assert coords == (1, 0, 1, 0, 0)
    for r, (rk, _) in enumerate(out):  # every rank is in its own groups, groups agree across members
        for name, members in rk.items():
            assert r in members
            for m in members:
                assert out[m][0][name] == members


def _cfg(**kw):
    base = dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("world,tp,pp,dp,ep,cfg,match", [
    (4, 2, 2, 2, 1, _cfg(), "world size"),
    (4, 4, 1, 1, 1, _cfg(), "num_kv_heads"),
    (4, 1, 1, 4, 3, _cfg(), "must divide parallel.data"),
    (2, 1, 1, 2, 2, _cfg(), "needs an MoE model"),
    (4, 1, 1, 4, 4, _cfg(num_experts=6, moe_top_k=2), "num_experts"),
    (8, 1, 8, 1, 1, _cfg(), "num_layers"),
    (2, 2, 1, 1, 1, _cfg(vocab_size=511), "vocab_size"),
])
def test_invalid_layouts_are_rejected(world, tp, pp, dp, ep, cfg, match):
    with pytest.raises(ValueError, match=match):
        validate_layout(world, tp, pp, dp, ep, 1, cfg)


def test_single_process_state():
    st = build_parallel_state()
    assert (st.world_size, st.tp, st.dp, st.pp) == (1, 1, 1, 1) and st.is_first_stage and st.is_last_stage
