"""Peak memory of the LM head + cross entropy, full logits vs chunked (CPU, one process per case).

    python bench/bench_chunked_ce.py [--tokens 2048 --hidden 512 --vocab 39296] [--chunks 256 1024]

A 1.5B-like head scaled down (dense_1.5b: hidden 2048, vocabulary 157184, 16384 tokens per
micro-batch).  Each case runs in a fresh process: build hidden states [1, N, H] and an FP32
head weight [V, H], warm up on a tiny shape, then one forward + backward of the loss; the
peak is the process's peak RSS minus its RSS just before (glibc returns large blocks to the
OS on free, so RSS follows the live allocations).  "full" is what the trainer runs today,
``lm_loss(head(h).float(), labels)``; "chunk C" is ``chunked_lm_loss(h, W, labels, C)``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def case(tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from megatron_ufp4.model.losses import chunked_lm_loss, lm_loss

    torch.manual_seed(0)

    def run(h, w, y):
        if chunk:
            loss = chunked_lm_loss(h, w, y, chunk_tokens=chunk)
        else:
            loss = lm_loss(F.linear(h, w).float(), y)
        loss.backward()
        return float(loss)

    small = (torch.randn(1, 64, hidden, requires_grad=True), torch.randn(64, hidden, requires_grad=True))
    run(*small, torch.randint(0, 64, (1, 64)))
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (1, tokens))
    before, t0 = _rss(), time.perf_counter()
    loss = run(h, w, y)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"chunk": chunk, "loss": loss, "peak_growth": peak - before, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=39296)
    ap.add_argument("--chunks", type=int, nargs="*", default=[256, 1024])
    ap.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case is not None:
        print(json.dumps(case(a.tokens, a.hidden, a.vocab, a.case)))
        return
    logits = a.tokens * a.vocab * 4
    print(f"N={a.tokens} tokens, H={a.hidden}, V={a.vocab}: FP32 logits {logits / 2**20:.0f} MiB, "
          f"FP32 head weight {a.vocab * a.hidden * 4 / 2**20:.0f} MiB")
    print("| case | peak RSS growth | x FP32 logits | fwd+bwd | loss |")
    print("|---|---|---|---|---|")
    for chunk in [0, *a.chunks]:
        out = subprocess.run([sys.executable, __file__, "--tokens", str(a.tokens), "--hidden", str(a.hidden),
                              "--vocab", str(a.vocab), "--case", str(chunk)], check=True, capture_output=True,
                             text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        name = f"chunk {chunk}" if chunk else "full logits"
        print(f"| {name} | {r['peak_growth'] / 2**20:.0f} MiB | {r['peak_growth'] / logits:.2f}x | "
              f"{r['seconds'] * 1e3:.0f} ms | {r['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
