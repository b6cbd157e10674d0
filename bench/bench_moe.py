"""Routed experts as grouped GEMMs vs the per-expert loop, side by side in one run.

    python bench/bench_moe.py [--config configs/tiny_moe.yaml] [--steps 6] [--experts 64] [--tokens 2048]

1. full optimizer steps (forward, backward, clip, AdamW) of the config's model on random
   tokens, its recipe, with the experts grouped and with the reference loop
   (``GroupedExperts.forward_loop``, one expert after the other);
2. one MoE layer with ``--experts`` routed experts, forward + backward on ``--tokens``
   tokens, per recipe, grouped vs loop.

Both arms run the same model with the same weights, their steps alternating (a shared
machine's load hits both alike); the grouped one is bitwise the loop (tests/
test_grouped_experts.py; the last column re-checks it at these shapes).  Medians after
warm-up.  Prints markdown for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from megatron_ufp4.config import load_config
from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.model import GPTModel, LinearFactory, ModelConfig, MoE
from megatron_ufp4.model.init import KeyedInit
from bench_train import make_train_step  # bench/ is on sys.path when run as bench/bench_moe.py


def use_loop(model, loop: bool):
    """The reference arm: every MoE layer's experts one after the other (same modules, same bits)."""
    for m in model.modules():
        if isinstance(m, MoE) and loop:
            m.experts.forward = m.experts.forward_loop
    return model


def medians(fns, steps: int, warmup: int) -> list[float]:
    """Median time of each function, the functions run in turn (a shared machine's load hits all alike)."""
    times = [[] for _ in fns]
    for i in range(warmup + steps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def train_step(cfg, backend: str, loop: bool):
    torch.manual_seed(0)
    m = cfg.model
    factory = LinearFactory(Recipe.from_dict(dict(cfg.recipe)), m.num_layers, backend=backend, seed=0)
    return make_train_step(use_loop(GPTModel(m, factory), loop), cfg)


def moe_layer(recipe: str, experts: int, tokens: int, hidden: int, ffn: int, top_k: int, loop: bool):
    cfg = ModelConfig(vocab_size=128, hidden_size=hidden, num_layers=4, num_heads=4, num_kv_heads=4,
                      ffn_hidden_size=ffn, max_seq_len=tokens, num_experts=experts, moe_top_k=top_k,
                      moe_ffn_hidden_size=ffn).validate()
    moe = MoE(cfg, LinearFactory(recipe, cfg.num_layers, seed=0), layer_index=1)
    moe.init_weights(KeyedInit(moe, 0), 0.02, 0.02)
    moe.step_context.at(0, 0)  # training keys: both arms draw the same noise every call
    return use_loop(moe, loop), torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0))


def fwd_bwd(moe, x):
    xr = x.clone().requires_grad_(True)
    y = moe(xr)
    y.square().mean().backward()
    out = [y.detach(), xr.grad] + [p.grad for p in moe.parameters()]
    moe.zero_grad(set_to_none=True)
    return out


def layer_step(**kw):
    moe, x = moe_layer(**kw)
    return lambda: fwd_bwd(moe, x)


def layer_bitwise(**kw) -> bool:
    """The experts' output, input gradient and every weight gradient of one call, grouped vs
    loop, at the benchmark's shapes.  (Compared at the experts: the layer's input gradient sums
    each token's top-k slots with an index_put that is not deterministic on CPU with several
    threads, in either arm.)"""
    moe, x = moe_layer(**kw, loop=False)
    with torch.no_grad():
        weights, idx, _ = moe.router(x)
        order, counts = moe.sort_slots(weights, idx)
    xs = x[order // idx.shape[1]]
    dy = torch.randn(xs.shape, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(moe.experts)
    outs = []
    for experts, fn in ((moe.experts, moe.experts.forward), (ref, ref.forward_loop)):
        xr = xs.clone().requires_grad_(True)
        y = fn(xr, counts)
        y.backward(dy)
        outs.append([y.detach(), xr.grad] + [p.grad for p in experts.parameters()])
    return all((u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
               for u, v in zip(*outs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_moe.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backends", default="emulated")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--recipes", default="ufp4,nvfp4,mxfp4")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. training.micro_batch_size=4")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, median of {args.steps} after {args.warmup} warm-up\n")
    n = cfg.training.micro_batch_size * cfg.data.seq_len
    print(f"{args.config}: recipe {Recipe.from_dict(dict(cfg.recipe)).name}, {n} tokens/step, "
          f"{cfg.model.num_experts} experts\n")
    print("| backend | per-expert loop | grouped | speed-up |\n|---|---|---|---|")
    for backend in args.backends.split(","):
        w = args.warmup + (2 if backend == "fused" else 0)
        loop, grouped = medians([train_step(cfg, backend, True), train_step(cfg, backend, False)], args.steps, w)
        print(f"| {backend} | {loop * 1e3:.0f} ms | {grouped * 1e3:.0f} ms | {loop / grouped:.2f}x |", flush=True)
    print(f"\nMoE layer: {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, expert ffn {args.ffn}, "
          f"{args.tokens} tokens, forward + backward\n")
    print("| recipe | per-expert loop | grouped | speed-up | bitwise equal |\n|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        kw = dict(recipe=recipe, experts=args.experts, tokens=args.tokens, hidden=args.hidden, ffn=args.ffn,
                  top_k=args.top_k)
        loop, grouped = medians([layer_step(loop=True, **kw), layer_step(loop=False, **kw)], args.steps, args.warmup)
        same = "yes" if layer_bitwise(**kw) else "NO"
        print(f"| {recipe} | {loop * 1e3:.0f} ms | {grouped * 1e3:.0f} ms | {loop / grouped:.2f}x | {same} |",
              flush=True)

if __name__ == "__main__":
    main()
