"""Pipeline parallelism: layer split, stage modules with global names, and PP=2 schedules
(1F1B, GPipe, interleaved 1F1B) against the single-process trainer's micro-batch loop.

Tolerance: the comparisons allow 1e-5 (absolute, on losses and gradients), but what was
measured is exact equality for every untied case, including the ufp4 recipe and MoE: a
stage runs the same ops on the same values as the full model, the loss is divided by the
number of micro-batches before backward (not the gradients after), and per module the
backward passes (the only place SR keys are drawn) run in micro-batch order in every
schedule, so the counter-based SR draws coincide too (the SR generator states are
checked equal).  Only an embedding both ends hold (tied, or MTP's token embedding) changes a
reduction order: its gradient contributions are summed per stage and then by an all-reduce
instead of inside autograd (measured ~2e-9).  Under the bf16 recipe that difference moves the
next step's weights smoothly.  Under an FP4 recipe it can flip an FP4 code in the next step
(a last-bit difference in a rounding decision: measured 2.3e-5 on AVX-512 machines, exact on
AVX2), so those cases (``TEACHER_FORCED``) start every step from the single-process weights:
all gradients but the embedding's are then bitwise equal, and the embedding's differs only by
the summation order of the same terms, bounded in ``_reordered_sum_bound``.
"""
from __future__ import annotations

import functools
import io

import pytest
import torch

from megatron_ufp4.model import GPTModel, LinearFactory, ModelConfig, MoE
from megatron_ufp4.linear import QuantizedLinear
from megatron_ufp4.parallel import ParallelState, build_parallel_state
from megatron_ufp4.parallel.pipeline import build_stage_modules, layer_indices, stage_layer_ranges, unique_parameters
from megatron_ufp4.parallel.pipeline_schedule import PipelineRunner

from conftest import one_thread
from dist_utils import run_ranks
from error_bounds import gamma

pytestmark = pytest.mark.numerical

N_MICRO, MBS, SEQ = 4, 2, 32
TOL = 1e-5
MOE = dict(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=64)
# name -> (recipe, schedule, vpp, stage-split kwargs, model kwargs, autocast, steps)
CASES = {
    "1f1b": ("bf16", "1f1b", 1, {}, {}, False, 2),
    "gpipe": ("bf16", "gpipe", 1, {}, {}, False, 1),
    "interleaved": ("bf16", "interleaved_1f1b", 2, {}, {}, False, 2),
    "uneven": ("bf16", "1f1b", 1, dict(first_stage_layers=1), {}, False, 1),
    "ufp4_1f1b": ("ufp4", "1f1b", 1, {}, {}, False, 1),
    "ufp4_interleaved": ("ufp4", "interleaved_1f1b", 2, {}, {}, False, 1),
    "moe": ("bf16", "1f1b", 1, {}, MOE, False, 1),
    "tied": ("bf16", "1f1b", 1, {}, dict(tie_embeddings=True), False, 2),
    "autocast": ("bf16", "1f1b", 1, {}, {}, True, 1),
    # multi-token prediction: the last stage holds the MTP modules and a copy of the embedding
    "mtp": ("ufp4", "1f1b", 1, {}, dict(mtp_depth=2, qk_norm=True, rotary_fraction=0.5), False, 2),
    "mtp_moe_tied": ("bf16", "interleaved_1f1b", 2, {}, dict(MOE, mtp_depth=1, tie_embeddings=True,
                                                              router_score="sigmoid", router_groups=2), False, 1),
}
LR = 0.5  # plain SGD between steps of the two-step cases (large, so step 2 sees visibly new weights)
# FP4 cases whose embedding gradient is all-reduced between the ends: every step from the reference's weights
TEACHER_FORCED = {"mtp"}


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                max_seq_len=SEQ)
    return ModelConfig(**{**base, **kw})


def build_model(recipe: str, model_kw: dict, device=None) -> GPTModel:
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return GPTModel(tiny_config(**model_kw), LinearFactory(recipe, 4))
    return GPTModel(tiny_config(**model_kw), LinearFactory(recipe, 4))


def batch(step: int, replica: int = 0):
    g = torch.Generator().manual_seed(100 + step + 10 * replica)
    shape = (N_MICRO * MBS, SEQ)
    return torch.randint(0, 512, shape, generator=g), torch.randint(0, 512, shape, generator=g)


def sr_states(modules) -> dict:
    return {name: m.gemms.generator.get_state() for mod in modules for name, m in mod.named_modules()
            if isinstance(m, QuantizedLinear) and m.quantized}


def moe_loads(modules) -> dict:
    return {name: m.load_accum.clone() for mod in modules for name, m in mod.named_modules() if isinstance(m, MoE)}


@torch.no_grad()
def sgd(params) -> None:
    for p in params:
        p -= LR * p.grad
        p.grad = None


# -- the single-process reference: the Trainer's micro-batch loop -------------------------------------
@functools.lru_cache(maxsize=None)
def reference(case: str, replica: int = 0) -> dict:
    recipe, _, _, _, model_kw, autocast, steps = CASES[case]
    with one_thread():
        model = build_model(recipe, model_kw)
        model.step_context.aux_loss_scale = 1.0 / N_MICRO
        out = {"loss": [], "forced": []}
        for step in range(steps):
            if step == 1:  # forward-only evaluation between the steps (eval mode, batch 0)
                model.eval()
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    tokens, labels = batch(0, replica)
                    out["eval"] = sum(float(model(t, labels=lab))
                                      for t, lab in zip(tokens.chunk(N_MICRO), labels.chunk(N_MICRO))) / N_MICRO
                model.train()
            if step > 0 and case in TEACHER_FORCED:  # the weights each pipeline step starts from
                out["forced"].append({k: p.detach().clone() for k, p in model.named_parameters()})
            if step == steps - 1 and case in TEACHER_FORCED:
                out["embed_terms"] = _embedding_terms(model)
            tokens, labels = batch(step, replica)
            total = torch.zeros(())
            for tok, lab in zip(tokens.chunk(N_MICRO), labels.chunk(N_MICRO)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = model(tok, labels=lab) / N_MICRO  # the trainer's loss: head + CE chunked over tokens
                loss.backward()
                total += loss.detach()
            out["loss"].append(float(total))
            if step < steps - 1:
                sgd(model.parameters())
        out["grads"] = {k: p.grad.clone() for k, p in model.named_parameters()}
        out["sr"], out["moe"] = sr_states([model]), moe_loads([model])
        if case in TEACHER_FORCED:
            out["embed_terms"] = out["embed_terms"]()
        return out


def _embedding_terms(model: GPTModel):
    """Record, over the rest of the run, every use of the embedding (the main input and each MTP
    module's lookup, per micro-batch), its positions, and per element the sum over uses and
    positions of the gradient's magnitude (float64).  Returns a function giving
    (uses, positions per use, that sum)."""
    uses, positions, mag = [0], [0], torch.zeros_like(model.embed.weight, dtype=torch.float64)

    def on_forward(module, inputs, output):
        uses[0] += 1
        ids = inputs[0].flatten()
        positions[0] = max(positions[0], ids.numel())

        def record(grad):  # returns None: the gradient passes on unchanged
            mag.index_add_(0, ids, grad.detach().abs().double().flatten(0, -2))

        output.register_hook(record)

    model.embed.register_forward_hook(on_forward)
    return lambda: (uses[0], positions[0], mag)


def _reordered_sum_bound(uses: int, positions: int, magnitudes: torch.Tensor) -> torch.Tensor:
    """Both runs sum the same per-use embedding gradients t (each computed by the same ops on
    bitwise-equal inputs), in different orders: autograd adds each micro-batch's uses into .grad,
    the pipeline sums each stage's uses and then all-reduces the two stages.  Any fp32 summation
    order of n terms is within gamma_(n-1) * sum|t| of the exact sum (Higham, Accuracy and
    Stability, Thm 4.1), so two orders differ by at most twice that, per element; and each
    computed |t| (itself a sum over <= ``positions`` token positions) is at most
    (1 + gamma_positions) times the recorded sum of its inputs' magnitudes."""
    return 2 * gamma(uses - 1) * (1 + gamma(positions)) * magnitudes


# -- what each pipeline rank does (one spawn runs every case) ---------------------------------------
def _pipeline_cases(rank, world_size, cases, forced_bytes):
    st = build_parallel_state(pp=2)  # 4 ranks: DP=2 replicas, pipeline groups [0, 2] and [1, 3]
    forced = torch.load(io.BytesIO(forced_bytes))  # (case, replica) -> the reference's weights per step
    results = {"dp_rank": st.dp_rank, "pp_rank": st.pp_rank, "pp_ranks": st.ranks["pp"]}
    for case in cases:
        recipe, schedule, vpp, split, model_kw, autocast, steps = CASES[case]
        stages = build_stage_modules(build_model(recipe, model_kw), st, vpp=vpp, **split)
        runner = PipelineRunner(stages, st, schedule=schedule, num_microbatches=N_MICRO, micro_batch_size=MBS,
                                seq_len=SEQ, autocast_dtype=torch.bfloat16 if autocast else None)
        out = {"loss": [], "layers": [layer_indices(s) for s in stages]}
        for step in range(steps):
            if step == 1:  # step -> evaluate -> step: the schedule switches modes and back
                tokens, labels = batch(0, st.dp_rank)
                runner.eval()
                out["eval"] = float(runner.evaluate(tokens if st.is_first_stage else None,
                                                    labels if st.is_last_stage else None))
                runner.train()
            tokens, labels = batch(step, st.dp_rank)
            loss = runner.step(tokens if st.is_first_stage else None, labels if st.is_last_stage else None)
            out["loss"].append(float(loss))
            if step < steps - 1 and case in TEACHER_FORCED:
                with torch.no_grad():
                    weights = forced[case, st.dp_rank][step]
                    for s in stages:
                        for k, p in s.named_parameters():
                            p.copy_(weights[k])
                            p.grad = None
            elif step < steps - 1:
                sgd(runner.parameters())
        out["grads"] = {k: p.grad.clone() for s in stages for k, p in s.named_parameters()}
        out["keys"] = [k for s in stages for k in s.state_dict()]
        out["sr"], out["moe"] = sr_states(stages), moe_loads(stages)
        results[case] = out
    buf = io.BytesIO()  # tensors as bytes: a queued tensor's shared memory dies with the rank's process
    torch.save(results, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipeline_results():
    """Per data-parallel replica, its pipeline ranks' results in pipeline order."""
    forced = {(case, d): reference(case, d)["forced"] for case in TEACHER_FORCED for d in range(2)}
    buf = io.BytesIO()
    torch.save(forced, buf)
    out = [torch.load(io.BytesIO(b)) for b in run_ranks(4, _pipeline_cases, list(CASES), buf.getvalue())]
    replicas = [[r for r in out if r["dp_rank"] == d] for d in range(2)]
    for d, rep in enumerate(replicas):
        assert [r["pp_rank"] for r in rep] == [0, 1] and rep[0]["pp_ranks"] == [d, d + 2]
    return replicas


def _merged(results, case, key):
    merged = {}
    for r in results:
        for k, v in r[case][key].items():
            assert k not in merged, f"{k} held by two stages"
            merged[k] = v
    return merged


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pp2_matches_single_process(pipeline_results, case):
    for replica, res in enumerate(pipeline_results):  # two replicas, different data, same model
        ref = reference(case, replica)
        assert res[0][case]["loss"] == res[1][case]["loss"]  # broadcast to every pipeline rank
        assert max(abs(a - b) for a, b in zip(res[1][case]["loss"], ref["loss"])) <= TOL
        model_kw = CASES[case][4]
        copies = {}
        if model_kw.get("mtp_depth"):  # the last stage's embedding copy (MTP; tied: also its head): equal grads
            copies["embed.weight"] = res[1][case]["grads"].pop("embed.weight")
        grads = _merged(res, case, "grads")
        if model_kw.get("tie_embeddings") and not model_kw.get("mtp_depth"):  # the last stage's head: the copy
            copies["embed.weight"] = grads.pop("head.weight")
        for k, v in copies.items():
            assert torch.equal(v, grads[k]), k
        if case in TEACHER_FORCED:  # identical weights: the embedding's grad is a reordered sum, the rest bitwise
            gap = (grads.pop("embed.weight").double() - ref["grads"]["embed.weight"].double()).abs()
            bound = _reordered_sum_bound(*ref["embed_terms"])
            assert bool((gap <= bound).all()), (gap.max().item(), (gap - bound).max().item())
            assert _max_diff(grads, {k: ref["grads"][k] for k in grads}) == 0.0
        assert _max_diff(grads, {k: ref["grads"][k] for k in grads}) <= TOL
        if not copies:  # an embedding both ends hold is summed by an all-reduce (and feeds step 2's weights)
            assert _max_diff(grads, ref["grads"]) == 0.0, "measured bitwise equal: a changed op order?"
        sr = _merged(res, case, "sr")
        assert set(sr) == set(ref["sr"]) and all(torch.equal(sr[k], ref["sr"][k]) for k in sr), "SR draws differ"
        if CASES[case][0] == "ufp4":
            assert sr, "the ufp4 case should have quantized (SR-drawing) linears"
        moe = _merged(res, case, "moe")
        assert set(moe) == set(ref["moe"]) and all(torch.equal(moe[k], ref["moe"][k]) for k in moe)
        if "eval" in ref:
            assert res[0][case]["eval"] == res[1][case]["eval"]
            assert abs(res[0][case]["eval"] - ref["eval"]) <= TOL
    assert pipeline_results[0][1][case]["loss"] != pipeline_results[1][1][case]["loss"]


@pytest.mark.slow
def test_stage_layout_and_global_names(pipeline_results):
    res = pipeline_results[1]
    assert [r["interleaved"]["layers"] for r in res] == [[[0], [2]], [[1], [3]]]  # chunk c on rank r: c * pp + r
    assert [r["uneven"]["layers"] for r in res] == [[[0]], [[1, 2, 3]]]
    for case in ("1f1b", "interleaved", "moe"):
        keys = [k for r in res for k in r[case]["keys"]]
        full = build_model(CASES[case][0], CASES[case][4]).state_dict()
        assert sorted(keys) == sorted(full) and len(keys) == len(set(keys))
    assert res[0]["1f1b"]["keys"][0] == "embed.weight" and res[1]["1f1b"]["keys"][-1] == "head.weight"


# -- single-process checks -------------------------------------------------------------------------
def test_stage_layer_ranges():
    assert stage_layer_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layer_ranges(8, 2, vpp=2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layer_ranges(5, 2, first_stage_layers=2) == [range(0, 2), range(2, 5)]
    assert stage_layer_ranges(10, 4, first_stage_layers=1, last_stage_layers=3) == [
        range(0, 1), range(1, 4), range(4, 7), range(7, 10)]
    assert stage_layer_ranges(6, 3, last_stage_layers=0) == [range(0, 3), range(3, 6), range(6, 6)]
    assert stage_layer_ranges(3, 1) == [range(0, 3)] == stage_layer_ranges(3, 1, first_stage_layers=3)


@pytest.mark.parametrize("args,kwargs,match", [
    ((3, 2), {}, "do not split evenly"),
    ((2, 4), {}, "cannot give each"),
    ((4, 2), dict(first_stage_layers=5), "first_stage_layers must be"),
    ((4, 2), dict(last_stage_layers=-1), "last_stage_layers must be"),
    ((4, 2), dict(first_stage_layers=2, last_stage_layers=1), "must equal num_layers"),
    ((4, 3), dict(first_stage_layers=3, last_stage_layers=2), "exceeds num_layers"),
    ((4, 1), dict(vpp=2), "needs pipeline > 1"),
    ((4, 1), dict(first_stage_layers=2), "single stage"),
    ((4, 0), {}, "pipeline must be"),
    ((0, 2), {}, "num_layers must be"),
])
def test_stage_layer_ranges_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        stage_layer_ranges(*args, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model_kw", [{}, dict(tie_embeddings=True), MOE], ids=["dense", "tied", "moe"])
def test_stage_names_are_global_and_cover_the_model(model_kw):
    full = build_model("ufp4", model_kw)
    ref = full.state_dict()
    for vpp, split in ((1, {}), (2, {}), (1, dict(last_stage_layers=1))):
        keys = []
        for r in range(2):
            stages = build_stage_modules(build_model("ufp4", model_kw), pp=2, pp_rank=r, vpp=vpp, **split)
            for s in stages:
                assert isinstance(s, GPTModel) and s.num_stages == 2 * vpp
                sd = s.state_dict()
                for k in sd:
                    layer = int(k.split(".")[1]) if k.startswith("layers.") else None
                    assert layer is None or layer in layer_indices(s)
                    if isinstance(sd[k], torch.Tensor):
                        assert torch.equal(sd[k], ref[k]), k
                keys += list(sd)
        assert sorted(keys) == sorted(ref) and len(keys) == len(set(keys))
    last = build_stage_modules(build_model("bf16", model_kw), pp=2, pp_rank=1)[0]
    assert (last.embed, last.norm is not None, last.head is not None) == (None, True, True)
    st = ParallelState(pp=2, pp_rank=1)
    n_unique = len(unique_parameters([last], st))
    assert n_unique == len(list(last.parameters())) - bool(model_kw.get("tie_embeddings"))


def test_mtp_last_stage_holds_the_mtp_modules_and_an_embedding_copy():
    ref = build_model("bf16", dict(mtp_depth=2)).state_dict()
    first, last = (build_stage_modules(build_model("bf16", dict(mtp_depth=2)), pp=2, pp_rank=r)[0] for r in (0, 1))
    assert first.mtp is None and last.mtp is not None and first.embed is not None and last.embed is not None
    keys = list(first.state_dict()) + list(last.state_dict())
    assert sorted(set(keys)) == sorted(ref) and [k for k in set(keys) if keys.count(k) > 1] == ["embed.weight"]
    assert torch.equal(first.embed.weight, last.embed.weight)
    st = ParallelState(pp=2, pp_rank=1)
    assert all(p is not last.embed.weight for p in unique_parameters([last], st))  # counted once, on stage 0


@pytest.mark.parametrize("model_kw", [{}, dict(tie_embeddings=True), MOE], ids=["dense", "tied", "moe"])
def test_meta_device_build_materialises_identical_weights(model_kw):
    ref = build_model("ufp4", model_kw)
    sd = ref.state_dict()
    for vpp in (1, 2):
        for r in range(2):
            meta = build_model("ufp4", model_kw, device="meta")
            torch.manual_seed(123)  # materialising is keyed by name and index: the global RNG plays no part
            stages = build_stage_modules(meta, pp=2, pp_rank=r, vpp=vpp, device="cpu")
            held = {k for s in stages for k in s.state_dict()}
            assert all(p.is_meta for k, p in meta.named_parameters() if k not in held)  # nothing else allocated
            for s in stages:
                assert not any(t.is_meta for t in [*s.parameters(), *s.buffers()])
                for k, v in s.state_dict().items():
                    assert not isinstance(v, torch.Tensor) or torch.equal(v, sd[k]), k
    with torch.device("meta"):
        half = GPTModel(tiny_config(), LinearFactory("bf16", 4, device="cpu"))
    with pytest.raises(ValueError, match="partly on the meta device"):
        build_stage_modules(half, pp=2, pp_rank=0, device="cpu")


def test_pp1_runner_is_the_trainer_loop():
    ref = reference("gpipe")
    with one_thread():
        model = build_model("bf16", {})
        runner = PipelineRunner(build_stage_modules(model, ParallelState()), ParallelState(), schedule="gpipe",
                                num_microbatches=N_MICRO, micro_batch_size=MBS, seq_len=SEQ)
        loss = runner.step(*batch(0))
    assert float(loss) == ref["loss"][0]
    assert _max_diff({k: p.grad for k, p in model.named_parameters()}, ref["grads"]) == 0.0


def test_runner_argument_errors():
    model = build_model("bf16", {})
    st = ParallelState(pp=2, pp_rank=0, vpp=2)
    two = build_stage_modules(model, st)
    kw = dict(num_microbatches=4, micro_batch_size=MBS, seq_len=SEQ)
    with pytest.raises(ValueError, match="must be one of"):
        PipelineRunner(two, st, schedule="zero_bubble", **kw)
    with pytest.raises(ValueError, match="use interleaved_1f1b"):
        PipelineRunner(two, st, schedule="1f1b", **kw)
    with pytest.raises(ValueError, match="must be virtual stage 0 of 4"):
        PipelineRunner(two[::-1], st, schedule="interleaved_1f1b", **kw)
    with pytest.raises(ValueError, match="needs num_microbatches >= pipeline=2"):
        PipelineRunner(build_stage_modules(model, ParallelState(pp=2)), ParallelState(pp=2), schedule="1f1b",
                       **{**kw, "num_microbatches": 1})
    with pytest.raises(ValueError, match="divisible by"):
        PipelineRunner(two, st, schedule="interleaved_1f1b", **{**kw, "num_microbatches": 5})
    one = ParallelState()
    runner = PipelineRunner(build_stage_modules(model, one), one, schedule="1f1b", **kw)
    with pytest.raises(ValueError, match="needs labels"):
        runner.step(batch(0)[0], None)
    with pytest.raises(ValueError, match="must have shape"):
        runner.step(*(t[:3] for t in batch(0)))
