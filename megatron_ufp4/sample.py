"""Generate text from a checkpoint.

    python -m megatron_ufp4.sample runs/tiny_dense --prompt "ROMEO:" --max-new-tokens 200
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ufp4-sample", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint directory (step_*) or run directory (latest checkpoint)")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: <data.prefix>.model)")
    args = ap.parse_args(argv)

    import torch

    from .data.tokenizer import Tokenizer
    from .training.checkpoint import CheckpointError
    from .training.inference import generate, load_trained_model

    try:
        model, cfg, _ = load_trained_model(args.checkpoint)
        tok = Tokenizer(args.tokenizer or cfg.data.prefix + ".model")
        prompt = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
        g = torch.Generator().manual_seed(args.seed)
        out = generate(model, prompt, args.max_new_tokens, cfg.model.max_seq_len, args.temperature,
                       args.top_k, g, tok.eos_id)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + tok.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
