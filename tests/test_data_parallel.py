"""Data parallelism: bucketed gradient all-reduce (dp / edp groups, missing gradients), the
ZeRO-1 distributed AdamW (partition, FQN-keyed checkpoints across DP sizes) and the global
gradient norm, against single-process AdamW on the full batch.

Tolerance 1e-5 rather than bitwise: a rank's loss is the mean over its half of the global
batch and the all-reduce adds g0/2 + g1/2, while one process sums every token inside one
reduction, so gradients differ in the last bits (measured <= 2e-8 absolute); AdamW's
elementwise update is then the same arithmetic on both sides (see HP for how it magnifies).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_ufp4.data.gpt_dataset import GlobalBatchSampler
from megatron_ufp4.linear.expert_linear import per_expert_name
from megatron_ufp4.model.expert_keys import stack_experts, unstack_expert_optimizer, unstack_experts
from megatron_ufp4.model.placement import named_placements
from megatron_ufp4.parallel import build_parallel_state
from megatron_ufp4.parallel.data_parallel import DataParallel, named_parameters
from megatron_ufp4.parallel.expert import build_expert_parallel_model, update_expert_bias
from megatron_ufp4.parallel.optimizer import (DistributedOptimizer, greedy_partition, merge_state_dicts,
                                              param_groups)

from dist_utils import run_ranks
from test_expert_parallel import T, tiny_model

pytestmark = [pytest.mark.numerical, pytest.mark.usefixtures("single_thread")]

GLOBAL_BATCH = 4
# AdamW's update lr * m / (sqrt(v) + eps) with the usual eps=1e-8 is ~ lr * g / |g|: a rounding
# difference on a near-zero gradient becomes a parameter difference up to ~lr, whatever its size
# (ill-conditioned), and a gradient wrong by a constant factor is invisible.  With eps=1 the
# update is ~ lr * m (the gradients here are << 1), Lipschitz in the gradient: the ~2e-8
# gradient differences give parameter differences ~ lr * 2e-8, far below the 1e-5 bound, while
# a gradient scaled wrongly by 2 moves parameters by ~ lr * |g| ~ 1e-4 and fails it.
HP = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1.0)
MAX_NORM = 0.5  # below the tiny model's gradient norms (~1-2): clipping is active every step


def samples(n=64, seed=2):
    return torch.randint(0, 512, (n, T + 1), generator=torch.Generator().manual_seed(seed))


def lm_loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


class SingleProcess:
    """The one-process step, from torch alone (the independent reference): torch's fused AdamW
    with the trainer's groups (matrices decayed, 1-D parameters not), torch's clip_grad_norm_,
    the expert-bias update."""

    def __init__(self, model):
        self.model = model
        self.opt = torch.optim.AdamW(param_groups(model.parameters(), HP["weight_decay"]), lr=HP["lr"],
                                     betas=HP["betas"], eps=HP["eps"], fused=True)

    def step(self, tokens):
        loss = lm_loss(self.model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
        self.opt.step()
        self.model.update_expert_bias()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)


class Parallel:
    """The parallel step, in the order a training loop uses: backward -> grad sync -> clip ->
    step (+ param sync) -> expert-bias update -> zero grads."""

    def __init__(self, model, st, dp=None, opt=None):
        self.model, self.st = model, st
        self.dp = dp or DataParallel(model, st, bucket_numel=4096)
        self.opt = opt or DistributedOptimizer(model, st, **HP)

    def step(self, tokens):
        loss = lm_loss(self.model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        self.dp.finish_grad_sync()
        norm = self.opt.clip_grad_norm(MAX_NORM)
        self.opt.step()
        update_expert_bias(self.model, self.st.group("dp"))
        self.opt.zero_grad()
        return float(norm)


def per_expert_sd(model) -> dict:
    """The model's state dict as checkpoints key it (stacked experts one by one), cloned."""
    return {k: v.clone() if torch.is_tensor(v) else v
            for k, v in unstack_experts(model.state_dict(), named_placements(model)).items()}


def per_expert_names(named, model) -> set:
    """Parameter names as checkpoints key them: a stacked expert parameter once per expert held."""
    placements = named_placements(model)
    return {per_expert_name(n, e) if placements[n].experts is not None else n
            for n, _ in named for e in (placements[n].experts or (None,))}


def max_param_diff(model, ref) -> float:
    ref_sd = per_expert_sd(ref)
    return max(float((v - ref_sd[k]).abs().max()) for k, v in per_expert_sd(model).items() if torch.is_tensor(v)
               and v.is_floating_point())


# -- single process ------------------------------------------------------------------------------------------
def test_greedy_partition():
    # largest first to the lighter bin: 10 -> 0, 8 -> 1, 3 -> 1 (8 < 10), 1 -> 0 (10 < 11), 1 -> 0 (tie: lowest)
    assert greedy_partition([10, 1, 1, 8, 3], 2) == [0, 0, 0, 1, 1]
    sizes = [4096, 64, 64, 32768, 2048, 2048, 64]
    owners = greedy_partition(sizes, 3)
    assert owners == greedy_partition(list(sizes), 3)  # deterministic
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(3)]
    assert max(load) == 32768 and sorted(set(owners)) == [0, 1, 2]
    assert greedy_partition([5, 5, 5], 1) == [0, 0, 0]


def test_zero_at_dp1_equals_torch_adamw_and_checkpoints():
    """One process (groups None): ZeRO owns everything and matches torch AdamW bit for bit;
    its FQN state dict equals the converted torch state and resumes identically."""
    data = samples()
    ref = SingleProcess(tiny_model())
    st = build_parallel_state()
    par = Parallel(tiny_model(), st)
    assert len(par.opt.owned) == len(named_parameters(par.model))
    for s in range(2):
        batch = data[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH]
        assert par.step(batch) == ref.step(batch)
    assert max_param_diff(par.model, ref.model) == 0
    sd = par.opt.state_dict()
    moments = {n: ref.opt.state[p] for n, p in ref.model.named_parameters() if p in ref.opt.state}
    conv = {n: {"exp_avg": m["exp_avg"].clone(), "exp_avg_sq": m["exp_avg_sq"].clone(),  # torch AdamW's, by name
                "step": torch.as_tensor(m["step"]).clone().float()} for n, m in moments.items()}
    # the checkpoint form: stacked experts one fqn per expert (views of the stacked moments)
    per_expert = unstack_expert_optimizer(conv, named_placements(ref.model))
    assert len(per_expert) > len(conv)  # the model has stacked experts
    assert sd.keys() == per_expert.keys()
    assert all(torch.equal(sd[k][f], per_expert[k][f]) for k in sd for f in sd[k])
    assert set(sd[next(iter(sd))]) == {"exp_avg", "exp_avg_sq", "step"} and float(sd[next(iter(sd))]["step"]) == 2
    # the stacked (model-fqn) form loads as well, to the same state
    stacked = Parallel(copy.deepcopy(ref.model), st)
    assert stacked.opt.load_state_dict(conv, strict=True) == len(conv)
    got = stacked.opt.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k][f], sd[k][f]) for k in sd for f in sd[k])
    # resume into a fresh ZeRO optimizer from the converted single-process state, keyed per expert
    resumed = Parallel(copy.deepcopy(ref.model), st)
    assert resumed.opt.load_state_dict(per_expert, strict=True) == len(conv)  # one per parameter
    batch = data[2 * GLOBAL_BATCH:3 * GLOBAL_BATCH]
    assert resumed.step(batch) == ref.step(batch) == par.step(batch)
    assert max_param_diff(resumed.model, ref.model) == 0 and max_param_diff(par.model, ref.model) == 0


def test_no_sync_is_required_for_accumulation():
    st = build_parallel_state()
    model = tiny_model()
    dp = DataParallel(model, st, bucket_numel=4096)
    tokens = samples(4)
    with dp.no_sync():
        lm_loss(model(tokens[:2, :-1]), tokens[:2, 1:]).backward()
    lm_loss(model(tokens[2:, :-1]), tokens[2:, 1:]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    dp.finish_grad_sync()  # one rank: the sum stays as it is
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    with pytest.raises(RuntimeError, match="no_sync"):
        lm_loss(model(tokens[:2, :-1]), tokens[:2, 1:]).backward()  # launched buckets, then a second backward
        lm_loss(model(tokens[2:, :-1]), tokens[2:, 1:]).backward()


# -- two ranks -----------------------------------------------------------------------------------------------
def _portable(obj, to_numpy=True):
    """Tensors <-> numpy arrays, recursively: tensors sent through run_ranks' queue travel as
    shared-memory handles that die with the rank process, arrays are pickled by value."""
    if isinstance(obj, dict):
        return {k: _portable(v, to_numpy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(v, to_numpy) for v in obj)
    if to_numpy and torch.is_tensor(obj):
        return obj.detach().cpu().numpy()
    if not to_numpy and type(obj).__module__ == "numpy" and hasattr(obj, "shape"):
        return torch.from_numpy(obj)
    return obj


def _dp_checks(rank, world):
    torch.set_num_threads(1)
    data = samples()
    out = {}

    # missing gradients: None on one rank counts as zero; None on every rank stays None
    st = build_parallel_state()
    lin = nn.Linear(4, 3)
    dp = DataParallel(lin, st, overlap=False)
    lin.weight.grad = torch.full((3, 4), 1.0) if rank == 0 else None
    lin.bias.grad = None
    dp.finish_grad_sync()
    out["missing_grad"] = (lin.weight.grad.tolist() if lin.weight.grad is not None else None, lin.bias.grad)

    for ep in (1, 2):  # DP=2 (experts replicated), and DP=2 with EP=2 (experts sharded)
        st = build_parallel_state(ep=ep)
        ref = SingleProcess(tiny_model())
        model = build_expert_parallel_model(tiny_model(), st, "alltoall")
        par = Parallel(model, st)
        par.dp.broadcast_params()
        owned = sorted(per_expert_names(par.opt.owned, model))  # each expert of a stack on its own
        ref_sampler = GlobalBatchSampler(len(data), GLOBAL_BATCH)
        sampler = GlobalBatchSampler(len(data), GLOBAL_BATCH, dp_rank=st.dp_rank, dp_size=st.dp)
        norms, diffs = [], []
        for _, ref_idx, idx in zip(range(3), ref_sampler, sampler):
            norms.append((par.step(data[idx]), ref.step(data[ref_idx])))
            diffs.append(max_param_diff(par.model, ref.model))
        out[f"ep{ep}"] = {"norms": norms, "diffs": diffs, "owned": owned,
                          "state_keys": sorted(par.opt.state_dict()),
                          "state_fqns": list(par.opt.checkpoint_placements()),
                          "bias": torch.stack([m.router.expert_bias for m in model.moe_layers()])}
        if ep == 2:  # checkpoint after 3 steps, then go on for 2 more at DP=2
            out["ckpt"] = {"model": per_expert_sd(model),
                           "optim": par.opt.state_dict(), "consumed": sampler.consumed_samples}
            for _, ref_idx, idx in zip(range(2), ref_sampler, sampler):
                par.step(data[idx])
                ref.step(data[ref_idx])
            out["after5"] = {k: v for k, v in per_expert_sd(model).items() if torch.is_tensor(v)}
            out["ref_after5"] = {k: v for k, v in per_expert_sd(ref.model).items() if torch.is_tensor(v)}
    return _portable(out)


@pytest.mark.slow
def test_data_parallel_zero1_two_ranks():
    outs = [_portable(o, to_numpy=False) for o in run_ranks(2, _dp_checks)]
    for o in outs:
        assert o["missing_grad"] == ([[0.5] * 4] * 3, None)
    for ep in (1, 2):
        for o in outs:
            r = o[f"ep{ep}"]
            assert max(r["diffs"]) < 1e-5, (ep, r["diffs"])
            for got, want in r["norms"]:
                assert abs(got - want) < 1e-5 * want and got > MAX_NORM, r["norms"]  # clipping was active
            assert r["state_keys"] == sorted(r["state_fqns"])  # the state holds the owned parameters only
        # every rank reports the same norm; dense params split between the two ranks, none twice
        assert outs[0][f"ep{ep}"]["norms"] == outs[1][f"ep{ep}"]["norms"]
        assert torch.equal(outs[0][f"ep{ep}"]["bias"], outs[1][f"ep{ep}"]["bias"])
        own0, own1 = set(outs[0][f"ep{ep}"]["owned"]), set(outs[1][f"ep{ep}"]["owned"])
        assert own0 and own1 and not own0 & own1
        full = tiny_model()  # every parameter (each expert of a stack) owned by a rank: at EP=2 its experts' rank
        assert own0 | own1 == per_expert_names(full.named_parameters(), full)
    # EP=2: each rank owns its own experts (edp groups are single ranks)
    assert {n.split(".")[4] for n in outs[1]["ep2"]["state_keys"] if ".experts." in n} == {"2", "3"}
    print("DP=2 vs single process, max param diff per step:", outs[0]["ep1"]["diffs"], outs[0]["ep2"]["diffs"])

    # the DP=2 / EP=2 checkpoint resumes at DP=1 (one process, every expert) and continues identically
    model_sd = merge_state_dicts(o["ckpt"]["model"] for o in outs)  # union: dense (equal) + both expert shards
    model = tiny_model()
    model.load_state_dict(stack_experts(model_sd))
    par = Parallel(model, build_parallel_state())
    assert par.opt.load_state_dict([o["ckpt"]["optim"] for o in outs], strict=True) == len(named_parameters(model))
    data = samples()
    sampler = GlobalBatchSampler(len(data), GLOBAL_BATCH, consumed_samples=outs[0]["ckpt"]["consumed"])
    for _, idx in zip(range(2), sampler):
        par.step(data[idx])
    sd = per_expert_sd(model)
    merged5 = merge_state_dicts(o["after5"] for o in outs)
    cont = max(float((sd[k] - v).abs().max()) for k, v in merged5.items() if v.is_floating_point())
    ref = max(float((sd[k] - v).abs().max()) for k, v in outs[0]["ref_after5"].items() if v.is_floating_point())
    print(f"resumed at DP=1 vs continued at DP=2: {cont:.2e}; vs single process throughout: {ref:.2e}")
    assert cont < 1e-5 and ref < 1e-5


def _dp4_checks(rank, world):
    """DP=4, EP=2: experts replicated over edp groups of 2 (ranks {0,2} and {1,3})."""
    torch.set_num_threads(1)
    data = samples()
    st = build_parallel_state(ep=2)
    ref = SingleProcess(tiny_model())
    model = build_expert_parallel_model(tiny_model(), st, "alltoall")
    par = Parallel(model, st)
    ref_sampler = GlobalBatchSampler(len(data), GLOBAL_BATCH)
    sampler = GlobalBatchSampler(len(data), GLOBAL_BATCH, dp_rank=st.dp_rank, dp_size=st.dp)
    norms, diffs = [], []
    for _, ref_idx, idx in zip(range(2), ref_sampler, sampler):
        norms.append((par.step(data[idx]), ref.step(data[ref_idx])))
        diffs.append(max_param_diff(model, ref.model))
    return {"norms": norms, "diffs": diffs, "edp": st.ranks["edp"], "owned": sorted(n for n, _ in par.opt.owned)}


@pytest.mark.slow
def test_dp4_ep2_expert_data_parallel():
    outs = run_ranks(4, _dp4_checks)
    assert [o["edp"] for o in outs] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    for o in outs:
        assert max(o["diffs"]) < 1e-5, o["diffs"]
        assert all(abs(a - b) < 1e-5 * b for a, b in o["norms"]) and o["norms"] == outs[0]["norms"]
    experts = [{n for n in o["owned"] if ".experts." in n} for o in outs]
    assert not experts[0] & experts[2] and experts[0] and experts[2]  # edp replicas split their experts' state
    print("DP=4 EP=2 vs single process, max param diff per step:", outs[0]["diffs"])
