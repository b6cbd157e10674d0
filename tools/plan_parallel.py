"""Plan a parallel layout: parameters and memory per rank, communication volume per step.

    python tools/plan_parallel.py configs/moe_124b.yaml parallel.tensor=2 parallel.pipeline=4 \
        parallel.expert=8 --world 256

Volumes are what one rank sends per optimizer step, from the model shape (ring
collectives: an all-reduce of S bytes over n ranks sends 2 S (n-1)/n, an all-gather or
reduce-scatter S (n-1)/n, an all-to-all S (n-1)/n):

* tensor: per layer and micro-batch, 2 all-reduces of the [b, s, h] activations forward and
  2 backward (sequence parallelism: the same volume as all-gather + reduce-scatter), plus
  the vocabulary-parallel embedding's forward all-reduce;
* pipeline: per micro-batch and stage boundary, the activation forward and its gradient back;
* data: the FP32 gradient all-reduce of this rank's dense parameters, plus ZeRO-1's
  parameter broadcast (each rank receives the (dp-1)/dp it does not own);
* expert: per MoE layer and micro-batch, the all-to-all of the routed token copies
  (b s k rows of h) out and back, forward and backward.

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


def plan(cfg, world: int) -> dict:
    m, t, p = cfg.model, cfg.training, cfg.parallel
    tp, pp, ep = p.tensor, p.pipeline, p.expert
    dp = p.data or world // (tp * pp)
    act_bytes = 2 if t.dtype == "bf16" else 4
    b, s, h, L = t.micro_batch_size, cfg.data.seq_len, m.hidden_size, m.num_layers
    micro = t.global_batch_size // (b * dp)
    counts = num_params(m)
    moe_layers = max(0, L - m.first_k_dense) if m.num_experts else 0
    e_ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size
    expert_params = moe_layers * m.num_experts * 3 * h * e_ffn
    dense_params = counts.total - expert_params
    per_rank_dense = dense_params / (tp * pp)
    per_rank_expert = expert_params / (tp * pp * ep)
    act = b * s * h * act_bytes
    ring_ar = lambda size, n: 2 * size * (n - 1) / n  # noqa: E731
    vol = {
        "tensor": (4 * (L / pp) + 1) * micro * ring_ar(act, tp) if tp > 1 else 0.0,
        "pipeline": (2 * micro * b * s * h * 4) if pp > 1 else 0.0,  # fp32 residual stream crosses stages
        "data": (ring_ar(per_rank_dense * 4, dp) + per_rank_dense * 4 * (dp - 1) / dp) if dp > 1 else 0.0,
        "expert": (4 * (moe_layers / pp) * micro * b * s * m.moe_top_k * h * act_bytes * (ep - 1) / ep)
        if ep > 1 else 0.0,
    }
    return {"world": world, "tp": tp, "pp": pp, "dp": dp, "ep": ep, "micro_batches": micro,
            "total_params": counts.total, "active_params": counts.active,
            "params_per_rank": per_rank_dense + per_rank_expert,
            # fp32 master weights + grads, AdamW moments sharded over dp (ZeRO-1) / edp for experts
            "state_bytes_per_rank": per_rank_dense * (8 + 8 / dp) + per_rank_expert * (8 + 8 * ep / dp),
            "comm_bytes_per_step": vol}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def materialize(cfg, world: int, rank: int) -> dict:
    """Build rank ``rank``'s chunks as the distributed trainer does; measure what it costs."""
    import torch

    from megatron_ufp4.parallel.build import build_rank_chunks
    from megatron_ufp4.parallel.parallel_factory import ParallelLinearFactory
    from megatron_ufp4.parallel.state import state_for_rank

    p = cfg.parallel
    dp = p.data or world // (p.tensor * p.pipeline)
    st = state_for_rank(rank, world, p.tensor, p.pipeline, dp, p.expert, p.virtual_pipeline, p.sequence_parallel,
                        cfg.model)
    recipe, backend = cfg.build_recipe()
    before, t0 = _rss_bytes(), time.perf_counter()
    factory = ParallelLinearFactory(recipe, cfg.model.num_layers, st, backend=backend, seed=cfg.training.seed)
    chunks = build_rank_chunks(cfg.model, factory, st, init_seed=cfg.training.seed, device=torch.device("cpu"),
                               dispatcher=p.expert_dispatcher, first_stage_layers=p.first_stage_layers,
                               last_stage_layers=p.last_stage_layers)
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
    ap.add_argument("--materialize", type=int, metavar="RANK", default=None,
                    help="build this rank's model as the trainer would and report its memory and build time")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        p = cfg.parallel
        if args.world % (p.tensor * p.pipeline) or (p.data and p.data * p.tensor * p.pipeline != args.world):
            raise ConfigError(f"--world {args.world} does not fit tensor x pipeline x data = "
                              f"{p.tensor} x {p.pipeline} x {p.data or '?'}")
        dp = p.data or args.world // (p.tensor * p.pipeline)
        if cfg.training.global_batch_size % (cfg.training.micro_batch_size * dp):
            raise ConfigError(f"training.global_batch_size={cfg.training.global_batch_size} is not a multiple of "
                              f"micro_batch_size x data = {cfg.training.micro_batch_size} x {dp}")
        r = plan(cfg, args.world)
        built = materialize(cfg, args.world, args.materialize) if args.materialize is not None else None
    except (ConfigError, ValueError) as e:
        print(f"plan_parallel.py: error: {e}", file=sys.stderr)
        return 2
    g = 1e9
    print(f"layout: {r['world']} ranks = tensor {r['tp']} x pipeline {r['pp']} x data {r['dp']} "
          f"(expert {r['ep']}); {r['micro_batches']} micro-batches per rank per step")
    print(f"parameters: {r['total_params'] / g:.2f}B total, {r['active_params'] / g:.2f}B active, "
          f"{r['params_per_rank'] / g:.3f}B per rank; weights+grads+AdamW state "
          f"{r['state_bytes_per_rank'] / 2**30:.1f} GiB per rank")
    for dim, v in r["comm_bytes_per_step"].items():
        print(f"  {dim:<9} {v / 2**20:12.1f} MiB sent per rank per step")
    if built is not None:
        span = f"layers {built['layers'][0]}..{built['layers'][-1]}" if built["layers"] else "no layers"
        print(f"materialized {built['state']} ({span}): {built['numel'] / g:.3f}B elements, "
              f"{built['param_bytes'] / 2**30:.2f} GiB parameters and buffers; peak RSS growth "
              f"{built['rss_growth'] / 2**30:.2f} GiB ({built['rss_growth'] / max(built['param_bytes'], 1):.2f}x); "
              f"built in {built['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
