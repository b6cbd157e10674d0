"""Process-group layout and validation."""
import pytest

from megatron_ufp4.model import ModelConfig
from megatron_ufp4.parallel import build_parallel_state, validate_layout
from megatron_ufp4.parallel.state import group_layouts, state_for_rank

from dist_utils import run_ranks


def _layout(world, tp, pp, ep):
    """Each rank's groups and coordinates, from the layout arithmetic alone (no processes)."""
    groups = group_layouts(tp, pp, world // (tp * pp), ep)
    out = []
    for r in range(world):
        st = state_for_rank(r, world, tp, pp, world // (tp * pp), ep)
        mine = {name: next(g for g in gs if r in g) for name, gs in groups.items()}
        out.append((mine, (st.tp_rank, st.dp_rank, st.pp_rank, st.ep_rank, st.edp_rank)))
    return out


def test_eight_rank_layout_matches_the_documented_example():
    out = _layout(8, 2, 2, 2)
    ranks, coords = out[5]
    assert ranks["tp"] == [4, 5] and ranks["dp"] == [5, 7] and ranks["pp"] == [1, 5]
    assert ranks["ep"] == [5, 7] and ranks["edp"] == [5]
    assert coords == (1, 0, 1, 0, 0)
    for name, groups in group_layouts(2, 2, 2, 2).items():  # every rank in exactly one group of each kind
        assert sorted(r for g in groups for r in g) == list(range(8)), name
    for r, (rk, _) in enumerate(out):  # groups agree across members
        for name, members in rk.items():
            for m in members:
                assert out[m][0][name] == members


def _groups(rank, world, tp, pp, ep):
    st = build_parallel_state(tp=tp, pp=pp, ep=ep)
    return {k: v for k, v in st.ranks.items()}, (st.tp_rank, st.dp_rank, st.pp_rank, st.ep_rank, st.edp_rank)


def test_process_groups_follow_the_layout_arithmetic():
    """The groups build_parallel_state creates on real ranks are the arithmetic's (4 ranks: TP2 x DP2, EP2)."""
    got = run_ranks(4, _groups, 2, 1, 2)
    want = _layout(4, 2, 1, 2)
    for r in range(4):
        assert {k: v for k, v in got[r][0].items() if k != "world"} == want[r][0]
        assert got[r][1] == want[r][1]


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
