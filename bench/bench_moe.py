"""Routed experts as grouped GEMMs vs the per-expert loop, side by side in one run.

    python bench/bench_moe.py [--config configs/tiny_moe.yaml] [--steps 6] [--experts 64] [--tokens 2048]

1. full optimizer steps (forward, backward, clip, AdamW) of the config's model on random
   tokens, its recipe, with the experts grouped and with the reference loop
   (``GroupedExperts.forward_loop``, one expert after the other);
2. one MoE layer with ``--experts`` routed experts, forward + backward on ``--tokens``
   tokens, per recipe, grouped vs loop.

Both arms run the same model with the same weights; the grouped one is bitwise the loop
(tests/test_grouped_experts.py).  Medians, after warm-up.  Prints markdown for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from megatron_ufp4.config import load_config
from megatron_ufp4.fp4.recipes import Recipe
from megatron_ufp4.model import GPTModel, LinearFactory, ModelConfig, MoE
from megatron_ufp4.model.init import KeyedInit
from megatron_ufp4.training.optim import build_optimizer, clip_grad_norm


def use_loop(model, loop: bool):
    """The reference arm: every MoE layer's experts one after the other (same modules, same bits)."""
    for m in model.modules():
        if isinstance(m, MoE) and loop:
            m.experts.forward = m.experts.forward_loop
    return model


def median(fn, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def train_step_time(cfg, backend: str, loop: bool, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    m, t = cfg.model, cfg.training
    factory = LinearFactory(Recipe.from_dict(dict(cfg.recipe)), m.num_layers, backend=backend, seed=0)
    model = use_loop(GPTModel(m, factory), loop)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.dtype == "bf16")

    def step():
        with autocast:
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        clip_grad_norm(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return median(step, steps, warmup)


def layer_time(recipe: str, experts: int, tokens: int, hidden: int, ffn: int, top_k: int, loop: bool,
               steps: int, warmup: int) -> float:
    cfg = ModelConfig(vocab_size=128, hidden_size=hidden, num_layers=4, num_heads=4, num_kv_heads=4,
                      ffn_hidden_size=ffn, max_seq_len=tokens, num_experts=experts, moe_top_k=top_k,
                      moe_ffn_hidden_size=ffn).validate()
    moe = MoE(cfg, LinearFactory(recipe, cfg.num_layers, seed=0), layer_index=1)
    moe.init_weights(KeyedInit(moe, 0), 0.02, 0.02)
    use_loop(moe, loop)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0))

    def step():
        xr = x.clone().requires_grad_(True)
        moe(xr).square().mean().backward()
        moe.zero_grad(set_to_none=True)
    return median(step, steps, warmup)


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
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. training.micro_batch_size=4")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    print(f"{torch.get_num_threads()} threads, median of {args.steps} after {args.warmup} warm-up\n")
    n = cfg.training.micro_batch_size * cfg.data.seq_len
    print(f"{args.config}: recipe {Recipe.from_dict(dict(cfg.recipe)).name}, {n} tokens/step, "
          f"{cfg.model.num_experts} experts\n")
    print("| backend | per-expert loop | grouped | speed-up |\n|---|---|---|---|")
    for backend in args.backends.split(","):
        w = args.warmup + (2 if backend == "fused" else 0)
        loop = train_step_time(cfg, backend, True, args.steps, w)
        grouped = train_step_time(cfg, backend, False, args.steps, w)
        print(f"| {backend} | {loop * 1e3:.0f} ms | {grouped * 1e3:.0f} ms | {loop / grouped:.2f}x |", flush=True)
    print(f"\nMoE layer: {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, expert ffn {args.ffn}, "
          f"{args.tokens} tokens, forward + backward\n")
    print("| recipe | per-expert loop | grouped | speed-up |\n|---|---|---|---|")
    for recipe in args.recipes.split(","):
        kw = dict(experts=args.experts, tokens=args.tokens, hidden=args.hidden, ffn=args.ffn, top_k=args.top_k,
                  steps=args.steps, warmup=args.warmup)
        loop, grouped = layer_time(recipe, loop=True, **kw), layer_time(recipe, loop=False, **kw)
        print(f"| {recipe} | {loop * 1e3:.0f} ms | {grouped * 1e3:.0f} ms | {loop / grouped:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
