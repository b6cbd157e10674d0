"""Text files -> sentencepiece tokenizer -> memory-mapped train/val token datasets.

    python -m megatron_ufp4.data.prepare --input corpus/ more.txt --output data/demo \\
        --vocab-size 4096 [--tokenizer-model existing.model] [--val-fraction 0.05] \\
        [--seed 0] [--glob '*.txt'] [--split-paragraphs] [--errors strict|replace] \\
        [--character-coverage 0.9995] [--overwrite]

Writes ``<prefix>.model`` (+ ``.vocab``), ``<prefix>_train.bin/.idx``,
``<prefix>_val.bin/.idx`` (format: indexed_dataset.py) and ``<prefix>.json`` (stats).
An existing dataset at the prefix is refused unless ``--overwrite``.  Every file is written
into a temporary directory beside the prefix and all are moved into place together once the
last is complete: a failure (bad input, a full disk, a signal) leaves nothing new behind and
the old dataset, if any, untouched.

Documents: one file = one document, or with ``--split-paragraphs`` each block of text
between blank lines.  Each document is tokenized and followed by EOS.  The train/val split
is a seeded permutation of documents (the first ``round(val_fraction * N)``, at least one,
go to val), and each split is stored in that permuted order.

Bad input is reported as one ``error: ...`` line on stderr with exit code 2.  Empty and
binary files are skipped with a warning (fatal only if nothing usable is left); invalid
UTF-8 is fatal unless ``--errors replace``.  The corpus text is held in memory: shard
corpora larger than RAM and prepare each shard separately.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..outputs import OutputError, Outputs, check_output
from .indexed_dataset import IndexedDatasetWriter, best_dtype
from .tokenizer import MIN_BYTE_FALLBACK_VOCAB, Tokenizer, train_sentencepiece

STATS_VERSION = 1
# A file whose first 64 KiB has more than 10% non-UTF-8 bytes is binary, not text with
# a few stray bytes (which gets the precise "invalid UTF-8 at offset" error instead).
BINARY_SNIFF_BYTES = 65536
BINARY_INVALID_FRACTION = 0.1
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


class DataError(Exception):
    """Bad input or output location: reported as one line on stderr, exit code 2."""


def collect_files(inputs: list[str], pattern: str) -> list[Path]:
    """Explicit files as given; directories searched recursively for ``pattern``, sorted."""
    files, seen = [], set()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input path does not exist: {raw}")
        found = sorted(p for p in path.rglob(pattern) if p.is_file()) if path.is_dir() else [path]
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                files.append(p)
    if not files:
        raise DataError(f"no files matching {pattern!r} found in: {' '.join(inputs)}")
    return files


def read_text_file(path: Path, errors: str) -> tuple[str | None, str | None]:
    """Return ``(text, None)``, or ``(None, reason)`` for a file to skip.

    Raises DataError on invalid UTF-8 when ``errors == "strict"``.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        return None, f"binary file (NUL byte at offset {nul})"
    sniff = data[:BINARY_SNIFF_BYTES]
    invalid = len(sniff) - len(sniff.decode("utf-8", "ignore").encode("utf-8"))
    if invalid > BINARY_INVALID_FRACTION * len(sniff):
        return None, f"binary file ({invalid} of the first {len(sniff)} bytes are not UTF-8)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise DataError(f"invalid UTF-8 in {path} at byte offset {e.start} "
                            f"(byte 0x{data[e.start]:02x}); pass --errors replace to "
                            f"substitute U+FFFD") from None
        print(f"warning: {path}: invalid UTF-8 from byte offset {e.start} replaced with U+FFFD",
              file=sys.stderr)
        text = data.decode("utf-8", "replace")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")  # BOM and CRLF are not content
    if not text.strip():
        return None, "empty file"
    return text, None


def split_documents(text: str, split_paragraphs: bool) -> list[str]:
    if not split_paragraphs:
        return [text.strip()]
    return [p.strip() for p in PARAGRAPH_BREAK.split(text) if p.strip()]


def split_train_val(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded document permutation: first ``num_val`` ids are val, the rest train."""
    order = np.random.default_rng(seed).permutation(num_docs)
    num_val = max(1, round(val_fraction * num_docs)) if val_fraction > 0 else 0
    if num_val >= num_docs:
        raise DataError(f"{num_docs} document(s) cannot be split into train and val with "
                        f"--val-fraction {val_fraction}; add text, use --split-paragraphs "
                        f"or lower --val-fraction")
    return order[num_val:], order[:num_val]


def training_lines(documents: list[str]):
    """sentencepiece trains on sentences; we feed it the non-blank lines."""
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def encode_batches(documents: list[str], max_docs: int = 1024, max_chars: int = 2_000_000):
    """Consecutive slices of ``documents``: big enough to keep sentencepiece's threads busy,
    small enough for the progress bar to move (a few whole books per batch)."""
    start, chars = 0, 0
    for end, doc in enumerate(documents, 1):
        chars += len(doc)
        if end - start >= max_docs or chars >= max_chars or end == len(documents):
            yield documents[start:end]
            start, chars = end, 0


def write_split(prefix: str, documents: list[str], tokenizer: Tokenizer, dtype, name: str, final: str) -> dict:
    """Tokenize ``documents`` (+EOS each) into ``<prefix>.bin/.idx``; return its stats (which
    name the ``final`` prefix the files will have)."""
    eos = tokenizer.eos_id
    with IndexedDatasetWriter(prefix, dtype) as writer, \
            tqdm(total=len(documents), desc=f"tokenize {name}", unit="doc", disable=None) as bar:
        for batch in encode_batches(documents):
            for ids in tokenizer.encode_batch(batch):
                writer.add_document(np.asarray(ids + [eos], dtype=np.int64))
            bar.update(len(batch))
    return {"prefix": final, "docs": writer.num_docs, "tokens": writer.num_tokens}


def output_files(prefix: str, given_tokenizer: str | None) -> list[str]:
    """Every file a prepare with ``--output prefix`` writes (the tokenizer model only when it is
    not the given one itself)."""
    files = [f"{prefix}_{split}{ext}" for split in ("train", "val") for ext in (".bin", ".idx")]
    files.append(f"{prefix}.json")
    model = f"{prefix}.model"
    if given_tokenizer is None:
        files += [model, f"{prefix}.vocab"]
    elif not (os.path.exists(model) and os.path.samefile(given_tokenizer, model)):
        files.append(model)
    return files


def load_tokenizer(path: str) -> Tokenizer:
    try:
        tokenizer = Tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    if tokenizer.eos_id < 0:
        raise DataError(f"tokenizer {path} has no EOS piece; documents need one")
    return tokenizer


def check_outputs(args: argparse.Namespace) -> list[str]:
    """The output files, refused in one line if one exists (without --overwrite) or is an input."""
    files = output_files(args.output, args.tokenizer_model)
    for f in files:
        try:
            check_output(f, overwrite=args.overwrite, inputs=args.input, what="--output", make_parents=True)
        except OutputError as e:
            if os.path.exists(f) and not args.overwrite:
                raise DataError(f"--output {args.output}: {os.path.basename(f)} already exists (a prepared dataset); "
                                "pass --overwrite to replace it") from None
            raise DataError(str(e)) from None
    return files


def prepare(args: argparse.Namespace) -> dict:
    start_time = time.time()
    prefix = args.output
    model_path = f"{prefix}.model"
    check_outputs(args)  # before anything is read: nothing of an existing dataset is replaced unless asked
    if args.tokenizer_model:
        given_tokenizer = load_tokenizer(args.tokenizer_model)  # fail before reading the corpus

    # 1. Read and validate every input file.
    documents, skipped, num_files_used = [], [], 0
    for path in tqdm(collect_files(args.input, args.glob), desc="read", unit="file", disable=None):
        text, reason = read_text_file(path, args.errors)
        if reason:
            skipped.append({"path": str(path), "reason": reason})
            continue
        num_files_used += 1
        documents.extend(split_documents(text, args.split_paragraphs))
    if not documents:
        details = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped)
        raise DataError(f"no usable text in the inputs; skipped {details}")
    for s in skipped:
        print(f"warning: skipping {s['path']}: {s['reason']}", file=sys.stderr)
    train_ids, val_ids = split_train_val(len(documents), args.val_fraction, args.seed)
    train_docs = [documents[i] for i in train_ids]
    val_docs = [documents[i] for i in val_ids]
    print(f"read {num_files_used} files -> {len(documents)} documents "
          f"({len(train_docs)} train, {len(val_docs)} val)")

    # 2. Outputs: written into a temporary directory beside them, moved into place together at the end.
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    stats_path = f"{prefix}.json"
    with Outputs(out_dir) as out:
        tmp_prefix = str(out.path(prefix))
        if args.tokenizer_model:
            tokenizer = given_tokenizer
            if model_path in output_files(prefix, args.tokenizer_model):  # keep the dataset self-contained
                shutil.copyfile(args.tokenizer_model, out.path(model_path))
        else:
            print(f"training sentencepiece BPE tokenizer (vocab {args.vocab_size}) -> {model_path}")
            try:
                tokenizer = train_sentencepiece(training_lines(train_docs), str(out.path(model_path)),
                                                args.vocab_size, seed=args.seed,
                                                character_coverage=args.character_coverage)
            except ValueError as e:  # sentencepiece names its own flag; point at ours
                raise DataError(str(e).replace("--character_coverage", "--character-coverage")) from None
            if tokenizer.vocab_size < args.vocab_size:
                print(f"note: the tokenizer has {tokenizer.vocab_size} pieces, not the --vocab-size "
                      f"{args.vocab_size} asked: the corpus supports no more BPE merges", file=sys.stderr)
        dtype = best_dtype(tokenizer.vocab_size)

        train_stats = write_split(f"{tmp_prefix}_train", train_docs, tokenizer, dtype, "train", f"{prefix}_train")
        val_stats = write_split(f"{tmp_prefix}_val", val_docs, tokenizer, dtype, "val", f"{prefix}_val")
        stats = _stats(args, start_time, num_files_used, skipped, model_path, tokenizer, dtype, train_stats,
                       val_stats)
        with open(out.path(stats_path), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
            f.write("\n")
        out.commit()
    return stats


def _stats(args, start_time, num_files_used, skipped, model_path, tokenizer, dtype, train_stats, val_stats) -> dict:
    return {
        "stats_version": STATS_VERSION,
        "inputs": list(args.input),
        "files_used": num_files_used,
        "files_skipped": skipped,
        "split_paragraphs": args.split_paragraphs,
        "errors": args.errors,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "character_coverage": None if args.tokenizer_model else args.character_coverage,
        "tokenizer_model": os.path.abspath(model_path),
        "tokenizer_source": os.path.abspath(args.tokenizer_model) if args.tokenizer_model else "trained",
        "requested_vocab_size": args.vocab_size,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        "train": train_stats,
        "val": val_stats,
        "elapsed_s": round(time.time() - start_time, 3),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_ufp4.data.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files and/or directories (searched recursively with --glob)")
    parser.add_argument("--output", required=True,
                        help="output prefix, e.g. data/shakespeare -> data/shakespeare_train.bin")
    parser.add_argument("--vocab-size", type=int,
                        help="tokenizer vocabulary size (required unless --tokenizer-model)")
    parser.add_argument("--tokenizer-model", help="use this sentencepiece .model instead of training")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of corpus characters that get their own piece; the rarest "
                             "rest are spelled with byte pieces")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--glob", default="*.txt", help="file pattern inside directories")
    parser.add_argument("--split-paragraphs", action="store_true",
                        help="one document per blank-line separated paragraph, not per file")
    parser.add_argument("--errors", choices=("strict", "replace"), default="strict",
                        help="invalid UTF-8: fail (strict) or substitute U+FFFD (replace)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset at --output (only once the new one is complete)")
    args = parser.parse_args(argv)
    if args.tokenizer_model is None:
        if args.vocab_size is None:
            parser.error("--vocab-size is required unless --tokenizer-model is given")
        if args.vocab_size <= MIN_BYTE_FALLBACK_VOCAB:
            parser.error(f"--vocab-size must exceed {MIN_BYTE_FALLBACK_VOCAB} "
                         f"(256 byte pieces + unk/bos/eos come first)")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. a cluster job killed) unwinds like Ctrl-C, so temp files get removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stats = prepare(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. unwritable output directory, disk full
        print(f"error: {e.strerror or e}: {e.filename or args.output}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: temp files removed, no partial dataset written", file=sys.stderr)
        return 130
    for split in ("train", "val"):
        s = stats[split]
        print(f"wrote {s['prefix']}.bin/.idx: {s['docs']} docs, {s['tokens']} tokens")
    print(f"vocab {stats['vocab_size']} ({stats['dtype']}), tokenizer {stats['tokenizer_model']}, "
          f"stats {args.output}.json, {stats['elapsed_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
