"""Plan a parallel layout: parameters and memory per pipeline stage, communication per step.

    python tools/plan_parallel.py configs/moe_124b.yaml parallel.tensor=2 parallel.pipeline=4 \
        parallel.expert=8 --world 256 [--gpus-per-node 8] [--ce-chunk TOKENS (default 1024; 0: full logits)]

Everything is computed from the config's shapes (no model is built, unless ``--materialize``).
Notation: b micro-batch, s sequence length, N = b s tokens per micro-batch, h hidden, f FFN
width, a heads, r = kv_heads / heads, V vocabulary, E experts, k top-k, f_e expert width,
f_s = shared experts x f_e, t = TP, β = activation bytes (2 for bf16, 4 for fp32), M
micro-batches per rank per step, EDP = DP / EP (replicas of one expert shard).

**Parameters per stage.**  ``stage_layer_ranges`` (parallel/pipeline.py) gives each virtual
stage its layers, honouring ``first_stage_layers`` / ``last_stage_layers``; pipeline rank p
holds virtual stages c pp + p.  Virtual stage 0 also holds the embedding (V h / t), the last
one the final norm and the head (V h / t; with tied embeddings and pp > 1 a second copy of
the embedding weight).  Attention / MLP / shared-expert linears and the vocabulary are split
over TP, norms and routers are replicated, routed experts are split over TP and EP.  Model
state per rank: FP32 weights (4 B) + FP32 grads (4 B) + AdamW moments (8 B) sharded over DP
(dense) or EDP (experts) by ZeRO-1.  The heaviest stage is reported, not an average.

**Activations saved for backward**, per layer and micro-batch, counted from what autograd
keeps in this code (model/layers.py, linear/linear_fn.py, model/moe.py; no recomputation).
The residual stream and the RMSNorm outputs are FP32 (the residual adds an FP32 embedding /
stage input to bf16 branch outputs; nn.RMSNorm returns FP32): 4 B.  σ = t with sequence
parallelism, else 1 (those tensors are replicated over TP without SP; linears save their
local input slice under SP and re-gather in backward).

* attention: norm input + norm output (the qkv linear's saved input) 8 N h / σ, the norm's
  saved FP32 reciprocal RMS 4 N / σ; the qkv output buffer β N h (1 + 2r) / t (kept alive
  by v, a view of it, saved by SDPA); rotated q and k β N h (1 + r) / t; the SDPA output
  and the proj input (a reshaped copy) 2 β N h / t; the SDPA log-sum-exp 4 N a / t;
* dense MLP (SwiGLU): norm input + output + reciprocal RMS (8 N h + 4 N) / σ; the gate_up
  output 2 β N f / t (gate and up are views of it), silu(gate) and the product (down's
  input) 2 β N f / t;
* MoE MLP: norm input + output + reciprocal RMS (8 N h + 4 N) / σ; router logits and
  scores (β + 4) N E; routed token copies in, expert outputs and their router-weighted
  copies 3 β N k h (balanced routing: N k rows reach each EP rank); expert intermediates
  4 β N k f_e / t; shared experts 4 β N f_s / t (plus small index tensors, not counted).

So a dense layer keeps (16 N h + 8 N) / σ + β N h (4 + 3 r) / t + 4 N a / t + 4 β N f / t
bytes.  This assumes the GPU kernels: a fused RMSNorm (torch's ``_fused_rms_norm``: saves
its input and the reciprocal RMS) and an SDPA kernel that takes GQA's k and v as they are.
On CPU torch's composite RMSNorm also saves x times the reciprocal RMS, 4 N h / σ more per
norm; tests/test_planner.py checks the formula plus that term against the tensors autograd
saves on CPU, for TP 1 and for TP 2 with and without sequence parallelism.

**Activation recomputation** (``training.recompute_granularity``, training/recompute.py):
``full`` leaves a recomputed layer only its FP32 input, 4 N h / σ, and in backward one
recomputed layer at a time holds its whole activations again (added once to the stage's peak);
``selective`` drops what core attention saves of its own, its output β N h / t and the
log-sum-exp 4 N a / t (its inputs q, k, v stay, held by the checkpoint; with a fused attention
kernel there is no T² score matrix to drop).  ``block`` recomputes the first
``recompute_num_layers`` layers of each model chunk (the MTP blocks follow the last chunk's).
tests/test_planner.py checks the kept bytes of all three against what autograd keeps on CPU
(not the transient) and that the planner recomputes the layers the trainer wraps.

**In-flight micro-batches** (whose activations a stage holds at its peak), by schedule:
``1f1b`` (assumed by default; the config's ``pipeline_schedule``): pipeline rank p holds
min(pp - p, M) micro-batches (the first stage pp, the last one); ``interleaved_1f1b``:
min(2 (pp - p - 1) + (vpp - 1) pp + 1, M vpp) chunk forwards of the rank's vpp chunks
(Megatron's warm-up count + 1), i.e. that many times the rank's activations / vpp;
``gpipe``: all M.  Without pipelining the trainer runs each micro-batch's forward and
backward back to back: 1.

**Logits** on the last stage: the FP32 logits of one in-flight micro-batch are
4 N V / t bytes (the unchunked cross entropy also keeps the bf16 head output and its saved
softmax / log-softmax, and its backward allocates two more FP32 copies: its transient peak
is ~3-4x this).  With the trainers' chunked cross entropy (``--ce-chunk C``, C = 1024 by default, model/losses.py
``chunked_lm_loss``, parallel/vocab_parallel.py ``vocab_parallel_chunked_cross_entropy``)
only one chunk's logits exist at a time: 4 C V / t (plus 8 N bytes: the row max and sum of
exponentials it keeps per token for backward).

**Communication**: bytes one rank sends per optimizer step (ring collectives: an all-reduce
of S bytes over n ranks sends 2 S (n-1)/n, an all-gather / reduce-scatter / all-to-all
S (n-1)/n), for the busiest pipeline stage of each dimension:

* tensor: per micro-batch, FP32 all-reduces of N rows of h (partial GEMM outputs are
  reduced in FP32): per dense layer 2 forward (attn proj, MLP down) + 2 backward (qkv,
  gate_up dgrad); per MoE layer the attention's 2 + 2, the shared experts' 1 + 1 and, as
  routed experts are TP-split too, 1 + 1 of the N k routed rows; the embedding's forward
  all-reduce and the head's dgrad all-reduce (sequence parallelism: the same volume as
  all-gather + reduce-scatter);
* pipeline: per micro-batch and stage boundary, the FP32 activation forward and its gradient back
  (a rank sends one of them per neighbour; [b, s/t, h] under sequence parallelism), plus, with
  tied embeddings, the all-reduce of the two copies' gradients between the first and last stage;
* data: the FP32 gradient all-reduce of this rank's dense parameters over DP, plus ZeRO-1's
  parameter broadcast (each rank receives the (dp-1)/dp it does not own);
* expert_data: the same for the routed expert parameters over EDP (dp / ep ranks);
* expert: per MoE layer and micro-batch, the all-to-all of the routed token copies
  (N k rows of h) out and back, forward and backward.

A TP group is TP consecutive ranks (parallel/state.py): with TP > ``--gpus-per-node`` (or TP
not dividing it) TP traffic crosses nodes, and the planner warns in one line.

``--materialize RANK`` builds that rank's model exactly as the trainer does (meta device,
then only its TP/PP/EP share allocated and initialised), without a process group, and
prints its parameter bytes, the peak RSS growth of the build and the build time.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

from megatron_ufp4.config import ConfigError, load_config
from megatron_ufp4.model import num_params
from megatron_ufp4.model.losses import DEFAULT_CE_CHUNK_TOKENS
from megatron_ufp4.parallel.pipeline import stage_layer_ranges, virtual_stage_of


def ring_all_reduce(size: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``size`` bytes over ``n`` ranks."""
    return 2 * size * (n - 1) / n if n > 1 else 0.0


def layer_params(m, i: int) -> dict:
    """Elements of layer ``i``: ``tp`` (split over TP), ``rep`` (replicated over TP: norms,
    router, row-parallel biases) and ``expert`` (routed experts, split over TP and EP)."""
    h, hd, bias = m.hidden_size, m.head_dim, m.bias
    qkv_out = (m.num_heads + 2 * m.num_kv_heads) * hd
    tp = h * qkv_out + m.num_heads * hd * h + (qkv_out if bias else 0)
    rep = 2 * h + (h if bias else 0) + (2 * hd if m.qk_norm else 0)
    if i >= m.num_layers:  # an MTP module's block: plus its 3 norms and replicated 2h -> h projection
        rep += 3 * h + 2 * h * h
    expert = 0
    if m.is_moe_layer(i):
        fe = m.expert_ffn_hidden_size
        rep += m.num_experts * h
        if m.num_shared_experts:
            fs = m.num_shared_experts * fe
            tp, rep = tp + 3 * h * fs + (2 * fs if bias else 0), rep + (h if bias else 0)
        expert = m.num_experts * (3 * h * fe + ((2 * fe + h) if bias else 0))
    else:
        f = m.ffn_hidden_size
        tp, rep = tp + 3 * h * f + (2 * f if bias else 0), rep + (h if bias else 0)
    return {"tp": tp, "rep": rep, "expert": expert}


def layer_activation_bytes(m, i: int, n_tokens: int, act_bytes: int, tp: int, sp: bool,
                           recompute: str = "none") -> float:
    """Bytes layer ``i`` keeps for backward for one micro-batch of ``n_tokens`` tokens on one
    rank (the module docstring derives each term); ``recompute``: none, selective or full (this
    layer recomputed whole)."""
    N, h, a, beta = n_tokens, m.hidden_size, m.num_heads, act_bytes
    r = m.num_kv_heads / m.num_heads
    sigma = tp if sp else 1
    if recompute == "full":  # only its input, kept by the checkpoint: the FP32 residual stream; an MTP
        return (beta if i >= m.num_layers else 4) * N * h / sigma  # block's is its proj output (β)
    attn = (8 * N * h + 4 * N) / sigma + beta * N * h * ((1 + 2 * r) + (1 + r) + 2) / tp + 4 * N * a / tp
    if recompute == "selective":  # core attention's own saves go: its output and the log-sum-exp
        attn -= beta * N * h / tp + 4 * N * a / tp
    if m.is_moe_layer(i):
        fe, k, E = m.expert_ffn_hidden_size, m.moe_top_k, m.num_experts
        mlp = ((8 * N * h + 4 * N) / sigma + (beta + 4) * N * E + 3 * beta * N * k * h + 4 * beta * N * k * fe / tp
               + 4 * beta * N * m.num_shared_experts * fe / tp)
    else:
        mlp = (8 * N * h + 4 * N) / sigma + 4 * beta * N * m.ffn_hidden_size / tp
    return attn + mlp


def recomputed_layers(cfg, chunk_layers: list[list[int]], has_mtp: bool) -> dict[int, str]:
    """{layer: "selective" | "full"} of the layers a rank's chunks recompute (training.recompute_*,
    training/recompute.py): selective every layer's core attention; full every layer (uniform) or
    the first recompute_num_layers of each chunk (block; the MTP blocks follow the last chunk's layers)."""
    t, m = cfg.training, cfg.model
    chunks = [list(c) for c in chunk_layers]
    if has_mtp and chunks:
        chunks[-1] += list(range(m.num_layers, m.num_layers + m.mtp_depth))
    if t.recompute_granularity == "none":
        return {}
    if t.recompute_granularity == "selective" or t.recompute_method == "uniform":
        return {i: t.recompute_granularity for c in chunks for i in c}
    return {i: "full" for c in chunks for i in c[:t.recompute_num_layers]}


def in_flight(schedule: str, pp: int, vpp: int, pp_rank: int, micro: int) -> float:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at its peak, in units
    of the rank's whole activation set (see the module docstring)."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(micro)
    if schedule == "interleaved_1f1b" and vpp > 1:
        return min(2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1, micro * vpp) / vpp
    return float(min(pp - pp_rank, micro))


def plan(cfg, world: int, ce_chunk: int | None = None, gpus_per_node: int = 8) -> dict:
    m, t, p = cfg.model, cfg.training, cfg.parallel
    tp, pp, ep, vpp = p.tensor, p.pipeline, p.expert, p.virtual_pipeline
    dp = p.data or world // (tp * pp)
    edp = max(1, dp // ep)
    sp = bool(p.sequence_parallel)
    act_bytes = 2 if t.dtype == "bf16" else 4
    b, s, h, V = t.micro_batch_size, cfg.data.seq_len, m.hidden_size, m.vocab_size
    N = b * s
    micro = t.global_batch_size // (b * dp)
    schedule = p.pipeline_schedule if pp > 1 else "none"
    counts = num_params(m)
    ranges = stage_layer_ranges(m.num_layers, pp, vpp, p.first_stage_layers, p.last_stage_layers)
    n_virtual = pp * vpp
    stages = []
    for r in range(pp):
        vs = [virtual_stage_of(c, r, pp) for c in range(vpp)]
        layers = [i for v in vs for i in ranges[v]]
        if n_virtual - 1 in vs:  # the MTP modules sit beside the head
            layers += list(range(m.num_layers, m.num_layers + m.mtp_depth))
        tp_el = rep_el = ex_el = 0
        acts = rebuilt = 0.0
        recomputed = recomputed_layers(cfg, [list(ranges[v]) for v in vs], n_virtual - 1 in vs)
        for i in layers:
            lp = layer_params(m, i)
            tp_el, rep_el, ex_el = tp_el + lp["tp"], rep_el + lp["rep"], ex_el + lp["expert"]
            kind = recomputed.get(i, "none")
            acts += layer_activation_bytes(m, i, N, act_bytes, tp, sp, kind)
            if kind == "full":  # in backward one recomputed layer at a time holds its activations again
                rebuilt = max(rebuilt, layer_activation_bytes(m, i, N, act_bytes, tp, sp))
        embed, head = 0 in vs, n_virtual - 1 in vs
        tied_copy = m.tie_embeddings and pp > 1  # first and last stage each hold the tied weight
        if embed:
            tp_el += V * h
        if head:
            rep_el += h  # final norm
            if not m.tie_embeddings or not embed:  # untied, or the last stage's copy of a tied weight
                tp_el += V * h
            if m.mtp_depth and not embed and not m.tie_embeddings:  # the MTP's copy of the embedding
                tp_el += V * h
        dense = tp_el / tp + rep_el
        expert = ex_el / (tp * ep)
        flight = in_flight(p.pipeline_schedule, pp, vpp, r, micro)
        act_total = acts * flight + rebuilt
        logits_full = 4 * N * V / tp
        logits = 0.0
        if head:
            held = flight if pp > 1 else 1.0  # the last stage: 1 (1F1B), M (GPipe)
            logits = logits_full * held if ce_chunk is None else 4 * min(ce_chunk, N) * V / tp + 8 * N * held
        state = dense * (8 + 8 / dp) + expert * (8 + 8 / edp)
        moe_layers = sum(1 for i in layers if m.is_moe_layer(i))
        dense_layers = len(layers) - moe_layers
        row = 4 * N * h  # one FP32 [N, h] tensor
        shared = 2 if m.num_shared_experts else 0
        tp_count = 4 * dense_layers + (2 + shared + 2 * m.moe_top_k) * moe_layers + int(embed) + int(head)
        vol = {
            "tensor": micro * tp_count * ring_all_reduce(row, tp),
            "pipeline": micro * (row / (tp if sp else 1)) * ((r < pp - 1) + (r > 0))
            + (ring_all_reduce(4 * V * h / tp, 2) if tied_copy and (embed or head) else 0.0),
            "data": (ring_all_reduce(dense * 4, dp) + dense * 4 * (dp - 1) / dp) if dp > 1 else 0.0,
            "expert_data": (ring_all_reduce(expert * 4, edp) + expert * 4 * (edp - 1) / edp) if edp > 1 else 0.0,
            "expert": (4 * moe_layers * micro * N * m.moe_top_k * h * act_bytes * (ep - 1) / ep) if ep > 1 else 0.0,
        }
        stages.append({"pp_rank": r, "layers": layers, "embedding": embed, "head": head,
                       "params": dense + expert, "dense_params": dense, "expert_params": expert,
                       "state_bytes": state, "activation_bytes": act_total, "in_flight": flight,
                       "logits_bytes": logits, "total_bytes": state + act_total + logits, "comm": vol})
    heaviest = max(stages, key=lambda st: st["total_bytes"])
    vol = {k: max(st["comm"][k] for st in stages) for k in stages[0]["comm"]}
    warnings = []
    if tp > gpus_per_node or gpus_per_node % tp:
        warnings.append(f"warning: tensor={tp} with {gpus_per_node} GPUs per node puts TP groups across nodes "
                        f"(TP traffic {vol['tensor'] / 2**30:.1f} GiB/step per rank over the inter-node network)")
    return {"world": world, "tp": tp, "pp": pp, "dp": dp, "ep": ep, "edp": edp, "vpp": vpp,
            "micro_batches": micro, "schedule": schedule, "ce_chunk": ce_chunk,
            "total_params": counts.total, "active_params": counts.active,
            "params_per_rank": heaviest["params"], "state_bytes_per_rank": heaviest["state_bytes"],
            "stages": stages, "heaviest_stage": heaviest["pp_rank"], "peak_bytes_per_rank": heaviest["total_bytes"],
            "comm_bytes_per_step": vol, "warnings": warnings}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def materialize(cfg, world: int, rank: int) -> dict:
    """Build rank ``rank``'s chunks as the trainer does (``build_model``); measure what it costs."""
    import torch

    from megatron_ufp4.parallel.build import build_model
    from megatron_ufp4.parallel.state import state_for_rank

    p = cfg.parallel
    dp = p.data or world // (p.tensor * p.pipeline)
    st = state_for_rank(rank, world, p.tensor, p.pipeline, dp, p.expert, p.virtual_pipeline, p.sequence_parallel,
                        cfg.model)
    before, t0 = _rss_bytes(), time.perf_counter()
    chunks = build_model(cfg, st, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    seen, nbytes, numel = set(), 0, 0
    for c in chunks:
        for t in [*c.parameters(), *c.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                nbytes, numel = nbytes + t.numel() * t.element_size(), numel + t.numel()
    layers = [int(k) for c in chunks for k in c.layers]
    return {"state": st.describe(), "layers": layers, "param_bytes": nbytes, "numel": numel,
            "rss_growth": max(0, peak - before), "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--world", type=int, required=True, help="total number of ranks")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, to check TP groups stay in a node")
    ap.add_argument("--ce-chunk", type=int, metavar="TOKENS", default=DEFAULT_CE_CHUNK_TOKENS,
                    help=f"tokens per chunk of the trainers' chunked cross entropy (default "
                         f"{DEFAULT_CE_CHUNK_TOKENS}, theirs); 0: full FP32 logits, as a loss of the logits has")
    ap.add_argument("--materialize", type=int, metavar="RANK", default=None,
                    help="build this rank's model as the trainer would and report its memory and build time")
    args = ap.parse_args(argv)
    try:
        if args.world < 1:
            raise ConfigError(f"--world must be >= 1 ranks (got {args.world})")
        if args.materialize is not None and not 0 <= args.materialize < args.world:
            raise ConfigError(f"--materialize {args.materialize}: a rank of 0..{args.world - 1}")
        cfg = load_config(args.config, args.overrides)
        p = cfg.parallel
        if args.world % (p.tensor * p.pipeline) or (p.data and p.data * p.tensor * p.pipeline != args.world):
            raise ConfigError(f"--world {args.world} does not fit tensor x pipeline x data = "
                              f"{p.tensor} x {p.pipeline} x {p.data or '?'}")
        dp = p.data or args.world // (p.tensor * p.pipeline)
        if cfg.training.global_batch_size % (cfg.training.micro_batch_size * dp):
            raise ConfigError(f"training.global_batch_size={cfg.training.global_batch_size} is not a multiple of "
                              f"micro_batch_size x data = {cfg.training.micro_batch_size} x {dp}")
        if args.gpus_per_node < 1 or args.ce_chunk < 0:
            raise ConfigError("--gpus-per-node must be positive and --ce-chunk >= 0")
        r = plan(cfg, args.world, ce_chunk=args.ce_chunk or None, gpus_per_node=args.gpus_per_node)
        built = materialize(cfg, args.world, args.materialize) if args.materialize is not None else None
    except (ConfigError, ValueError) as e:
        print(f"plan_parallel.py: error: {e}", file=sys.stderr)
        return 2
    g, gib = 1e9, 2**30
    print(f"layout: {r['world']} ranks = tensor {r['tp']} x pipeline {r['pp']} x data {r['dp']} "
          f"(expert {r['ep']}, expert-data {r['edp']}); {r['micro_batches']} micro-batches per rank per step; "
          f"schedule {r['schedule']}")
    print(f"parameters: {r['total_params'] / g:.2f}B total, {r['active_params'] / g:.2f}B active, "
          f"{r['params_per_rank'] / g:.3f}B per rank on the heaviest stage; weights+grads+AdamW state "
          f"{r['state_bytes_per_rank'] / gib:.1f} GiB per rank")
    ce = "unchunked CE" if r["ce_chunk"] is None else f"CE chunk {r['ce_chunk']} tokens"
    for st in r["stages"]:
        lay = f"layers {st['layers'][0]}..{st['layers'][-1]}" if st["layers"] else "no layers"
        extra = "".join([" +embedding" if st["embedding"] else "", " +norm/head" if st["head"] else ""])
        print(f"  stage {st['pp_rank']}: {lay}{extra}; {st['params'] / g:.3f}B params, state "
              f"{st['state_bytes'] / gib:.1f} GiB, activations {st['activation_bytes'] / gib:.1f} GiB "
              f"(x{st['in_flight']:g} micro-batches in flight), "
              + (f"FP32 logits {st['logits_bytes'] / gib:.1f} GiB ({ce}), " if st["head"] else "")
              + f"total {st['total_bytes'] / gib:.1f} GiB")
    print(f"heaviest stage: {r['heaviest_stage']} at {r['peak_bytes_per_rank'] / gib:.1f} GiB per rank "
          f"(state + activations + logits; recomputation: {cfg.training.recompute_granularity})")
    for dim, v in r["comm_bytes_per_step"].items():
        print(f"  {dim:<11} {v / 2**20:12.1f} MiB sent per rank per step")
    for w in r["warnings"]:
        print(w)
    if built is not None:
        span = f"layers {built['layers'][0]}..{built['layers'][-1]}" if built["layers"] else "no layers"
        print(f"materialized {built['state']} ({span}): {built['numel'] / g:.3f}B elements, "
              f"{built['param_bytes'] / 2**30:.2f} GiB parameters and buffers; peak RSS growth "
              f"{built['rss_growth'] / 2**30:.2f} GiB ({built['rss_growth'] / max(built['param_bytes'], 1):.2f}x); "
              f"built in {built['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
