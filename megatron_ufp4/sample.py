"""Generate text from a checkpoint.

    python -m megatron_ufp4.sample runs/tiny_dense --prompt "ROMEO:" --max-new-tokens 200 [--device cuda]
"""
from __future__ import annotations

import argparse
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ufp4-sample", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint directory (step_*) or run directory (latest checkpoint)")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=200, help=">= 0")
    ap.add_argument("--temperature", type=float, default=0.8, help="finite, >= 0 (0: greedy)")
    ap.add_argument("--top-k", type=int, default=50, help=">= 0 (0: no top-k cut)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="sentencepiece .model, tokenizer.json or a directory holding one "
                    "(default: the run's data.tokenizer, else the one stored with its data.prefix dataset)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    args = ap.parse_args(argv)
    bad = [("--max-new-tokens must be >= 0", args.max_new_tokens, args.max_new_tokens >= 0),
           ("--temperature must be a finite number >= 0 (0: greedy)", args.temperature,
            math.isfinite(args.temperature) and args.temperature >= 0),
           ("--top-k must be >= 0 (0: no top-k cut)", args.top_k, args.top_k >= 0),
           ("--seed must be in [-2^63, 2^64)", args.seed, -2 ** 63 <= args.seed < 2 ** 64)]  # torch's seed range
    for what, value, ok in bad:  # checked before any checkpoint is read
        if not ok:
            print(f"error: {what} (got {value})", file=sys.stderr)
            return 2

    import torch

    from .data.tokenizer import load_tokenizer
    from .training.checkpoint import CheckpointError
    from .training.inference import generate, load_trained_model
    from .training.run_setup import run_tokenizer, select_device

    try:
        model, cfg, _ = load_trained_model(args.checkpoint, select_device(args.device, field="--device"))
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else run_tokenizer(cfg, needed_for="sample")
        if tok.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces, "
                             f"more than the model's vocabulary (model.vocab_size={cfg.model.vocab_size}): "
                             "it is not the tokenizer this model was trained with")
        prompt = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
        g = torch.Generator().manual_seed(args.seed)
        out = generate(model, prompt, args.max_new_tokens, cfg.model.max_seq_len, args.temperature,
                       args.top_k, g, tok.eos_id, vocab_limit=tok.vocab_size)  # a padded vocabulary's extra ids: never
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + tok.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
