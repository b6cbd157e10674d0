"""Dataset preparation throughput: tokens/s of ``megatron_ufp4.data.prepare`` with 1 and 2 workers.

    python bench/bench_prepare.py [--mb 24] [--repeats 2] [--vocab-size 4096]

The corpus: the demo texts (``data/shakespeare/*.txt``) when they are there, else
tests/data/shakespeare_sample.txt, cut into paragraphs and repeated into a JSON-lines file of
about ``--mb`` MB.  Two tokenizers of ``--vocab-size`` are trained once on the text: a
sentencepiece BPE (the recipe prepare uses) and a Hugging Face byte-level BPE tokenizer.json
(``tokenizers``).  For each, prepare runs as a command with ``--workers 1`` and ``--workers 2`` on
the same input (best of ``--repeats``); tokens/s is the tokens written over prepare's own elapsed
time (reading, tokenizing, writing, worker start; not the interpreter start).  The outputs of the
two worker counts are checked to be byte-identical.  Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "shakespeare_sample.txt"


def paragraphs() -> tuple[list[str], str]:
    texts = sorted((REPO / "data" / "shakespeare").glob("*.txt"))
    source = "data/shakespeare/*.txt" if texts else "tests/data/shakespeare_sample.txt"
    paras = []
    for path in texts or [SAMPLE]:
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        paras += [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    return paras, source


def write_corpus(paras: list[str], path: Path, megabytes: float) -> int:
    lines = [json.dumps({"text": p}) + "\n" for p in paras]
    size, n = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            line = lines[n % len(lines)]
            f.write(line)
            size += len(line.encode())
            n += 1
    return n


def train_tokenizers(paras: list[str], root: Path, vocab_size: int) -> dict[str, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_ufp4.data.tokenizer import train_sentencepiece

    lines = [line for p in paras for line in p.split("\n") if line.strip()]
    sp = root / "sp.model"
    train_sentencepiece(lines, str(sp), vocab_size)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    hf.save(str(root / "tokenizer.json"))
    return {"sentencepiece": sp, "huggingface tokenizer.json": root / "tokenizer.json"}


def run_prepare(corpus: Path, tokenizer: Path, workers: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "megatron_ufp4.data.prepare", "--input", str(corpus), "--output", str(out),
           "--tokenizer", str(tokenizer), "--workers", str(workers), "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"prepare failed: {proc.stderr[-600:]}")
    return json.loads(Path(f"{out}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=24, help="corpus size in MB of JSON lines")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest counts")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    paras, source = paragraphs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        records = write_corpus(paras, corpus, args.mb)
        tokenizers = train_tokenizers(paras, root, args.vocab_size)
        print(f"{source}: {len(paras)} paragraphs repeated into {records} JSON-lines records "
              f"({corpus.stat().st_size / 1e6:.1f} MB); {cores} CPU cores; best of {args.repeats}\n")
        for name, tokenizer in tokenizers.items():
            rates, outputs = {}, {}
            for workers in (1, 2):
                out = root / f"out_w{workers}" / "ds"
                out.parent.mkdir(exist_ok=True)
                best = min((run_prepare(corpus, tokenizer, workers, out) for _ in range(args.repeats)),
                           key=lambda s: s["elapsed_s"])
                tokens = best["train"]["tokens"] + best["val"]["tokens"]
                rates[workers] = (tokens, best["elapsed_s"], tokens / best["elapsed_s"])
                outputs[workers] = {p.name: p.read_bytes() for p in out.parent.iterdir()
                                    if p.suffix in (".bin", ".idx")}
            if outputs[1] != outputs[2]:
                raise SystemExit(f"{name}: the outputs of --workers 1 and 2 differ")
            for workers, (tokens, seconds, rate) in rates.items():
                ratio = "1.00x" if workers == 1 else f"{rate / rates[1][2]:.2f}x"
                rows.append(f"| {name} | {workers} | {tokens:,} | {seconds:.2f} | {rate:,.0f} | {ratio} |")
    print("| tokenizer | --workers | tokens | prepare time (s) | tokens/s | vs 1 worker |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
