"""Text or JSON-lines corpora -> tokenizer -> memory-mapped train/val token datasets.

    python -m megatron_ufp4.data.prepare --input corpus/ more.jsonl.gz --output data/demo \\
        [--tokenizer PATH | --vocab-size 4096] [--eos-token TOKEN] [--json-keys text ...] \\
        [--val-fraction 0.05] [--seed 0] [--glob '*.txt'] [--split-paragraphs] \\
        [--errors stop|skip|replace] [--workers N] [--make-vocab-size-divisible-by 128] \\
        [--character-coverage 0.9995] [--overwrite]

Writes a dataset at the prefix P = ``--output`` (with several ``--json-keys``, one dataset per key
at P = ``<output>_<key>``): ``P_train.bin/.idx`` and ``P_val.bin/.idx`` (indexed_dataset.py),
the tokenizer (``P.model`` and, when trained here, ``P.vocab`` for sentencepiece;
``P.tokenizer.json`` for Hugging Face) and ``P.json`` (stats, and the tokenizer's kind, file and
EOS, which ``tokenizer.dataset_tokenizer(P)`` reads).  ``P.json`` also records
``padded_vocab_size``: the vocabulary size rounded up to a multiple of
``--make-vocab-size-divisible-by`` (Megatron's rule); ``vocab_size`` stays the real size.

Tokenizer: ``--tokenizer`` takes a sentencepiece ``.model``, a Hugging Face ``tokenizer.json`` or
a directory holding one (never fetched from a network; EOS rule: tokenizer.py).  Without it, a
sentencepiece BPE of ``--vocab-size`` is trained on a seeded sample of at most 2M non-blank lines
of the training records, drawn in a first pass over the inputs.

Documents (inputs, bad records: prepare_inputs.py) are stored in input order, each one's token
ids followed by the EOS id, as Megatron appends the end of document.  Split: record i (0-based,
input order) goes to val when ``int.from_bytes(blake2b(f"{seed}:{i}", digest_size=8), "big") /
2**64 < val_fraction``, so it is decided per record without knowing their number; with several
keys a record's documents share its split.

Memory stays bounded whatever the corpus size: records are read one at a time and at most
``2 * --workers + 1`` batches of them are in flight (what grows is the writers' index of
document lengths, a few bytes a document).  ``--workers N`` processes parse the JSON lines and
tokenize, a batch at a time; bad records are judged and documents written in input order by
this process, so the outputs are byte-identical for any N.

An existing dataset at a prefix is refused unless ``--overwrite``.  Every file is written into a
temporary directory beside the prefix and all are moved into place together once the last is
complete: a failure (bad input, a full disk, Ctrl-C, SIGTERM) leaves nothing new behind and the
old dataset, if any, untouched.  Bad input is reported as one ``error: ...`` line on stderr
with exit code 2.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from tqdm import tqdm

from ..outputs import OutputError, Outputs, check_output
from .indexed_dataset import IndexedDatasetWriter, best_dtype
from .prepare_inputs import (BadRecord, DataError, InputReader, collect_files, in_val, is_json_input, parse_unit,
                             sample_training_lines, unit_size, warn)
from .tokenizer import (DATASET_TOKENIZER_SUFFIX, MIN_BYTE_FALLBACK_VOCAB, SENTENCEPIECE, BaseTokenizer,
                        load_tokenizer, tokenizer_record, train_sentencepiece)

__all__ = ["DataError", "main", "parse_args", "prepare", "prepare_datasets"]

STATS_VERSION = 2
BATCH_MAX_UNITS = 512
BATCH_MAX_BYTES = 1 << 19
TOKENIZER_TRAINING_LINES = 2_000_000
SPLITS = ("train", "val")
# Every tokenizer file a dataset prefix may have (an overwrite removes those of another kind).
TOKENIZER_COMPANIONS = (".model", ".vocab", ".tokenizer.json")


def dataset_prefixes(output: str, keys: list[str]) -> dict[str, str]:
    return {keys[0]: output} if len(keys) == 1 else {key: f"{output}_{key}" for key in keys}


def _same_file(a: str | None, b: str) -> bool:
    return a is not None and os.path.exists(b) and os.path.samefile(a, b)


def output_files(prefix: str, kind: str, given_path: str | None) -> list[str]:
    """Every file a dataset at ``prefix`` gets (its tokenizer only when not the given one itself)."""
    files = [f"{prefix}_{split}{ext}" for split in SPLITS for ext in (".bin", ".idx")] + [f"{prefix}.json"]
    tokenizer = [prefix + DATASET_TOKENIZER_SUFFIX[kind]]
    if given_path is None:
        tokenizer.append(f"{prefix}.vocab")  # the trained model's readable vocabulary
    return files + [f for f in tokenizer if not _same_file(given_path, f)]


def check_outputs(args: argparse.Namespace, prefixes: dict[str, str], kind: str, given_path: str | None) -> None:
    """Refuse, in one line, an existing output file (without --overwrite) or one that is an input."""
    for prefix in prefixes.values():
        companions = [prefix + s for s in TOKENIZER_COMPANIONS if not _same_file(given_path, prefix + s)]
        for f in dict.fromkeys(output_files(prefix, kind, given_path) + companions):
            try:
                check_output(f, overwrite=args.overwrite, inputs=args.input, what="--output", make_parents=True)
            except OutputError as e:
                if os.path.exists(f) and not args.overwrite:
                    raise DataError(f"--output {args.output}: {os.path.basename(f)} already exists (a prepared "
                                    "dataset); pass --overwrite to replace it") from None
                raise DataError(str(e)) from None


# -- parsing and tokenizing: in this process or in --workers processes, results in input order ------------
class BatchEncoder:
    """A batch of units -> (per record: file index, line, the key indices of its documents or a
    BadRecord, the offset of a byte replaced with U+FFFD), every document's ids + EOS concatenated
    in the dataset dtype, and the document lengths."""

    def __init__(self, tokenizer: BaseTokenizer, dtype, keys: list[str], errors: str):
        self.tokenizer, self.dtype, self.eos = tokenizer, np.dtype(dtype), tokenizer.eos_id
        self.keys, self.errors = keys, errors

    def __call__(self, units: list) -> tuple[list, np.ndarray, np.ndarray]:
        records, texts = [], []
        for unit in units:
            for file_index, lineno, result, replaced in parse_unit(unit, self.keys, self.errors):
                if not isinstance(result, BadRecord):
                    present = tuple(k for k, text in enumerate(result) if text is not None)
                    texts += [result[k] for k in present]
                    result = present  # not the texts: they need not travel back
                records.append((file_index, lineno, result, replaced))
        flat, lengths = [], []
        for ids in self.tokenizer.encode_batch(texts, num_threads=1):  # parallelism: the worker processes
            flat += ids
            flat.append(self.eos)
            lengths.append(len(ids) + 1)
        return records, np.array(flat, dtype=self.dtype), np.array(lengths, dtype=np.int64)


# Set only inside a --workers process, once, by its pool initializer (the one way a
# ProcessPoolExecutor hands a worker state that is not pickled with every task); never in the
# process that runs prepare.
_worker_encoder: BatchEncoder | None = None


def _start_worker(tokenizer_path: str, eos_token: str, dtype: str, keys: list[str], errors: str) -> None:
    # Ctrl-C reaches the whole process group: the parent alone unwinds (and ends the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_encoder
    _worker_encoder = BatchEncoder(load_tokenizer(tokenizer_path, eos_token), dtype, keys, errors)


def _encode_in_worker(units: list) -> tuple[list, np.ndarray, np.ndarray]:
    return _worker_encoder(units)


def unit_batches(units):
    """Lists of units: enough text to amortize a worker round trip, little enough for the progress bar."""
    batch, size = [], 0
    for unit in units:
        batch.append(unit)
        size += unit_size(unit)
        if len(batch) >= BATCH_MAX_UNITS or size >= BATCH_MAX_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encoded_batches(batches, encoder: BatchEncoder, workers: int):
    """The encoder's result for each batch, in input order."""
    if workers == 1:
        yield from map(encoder, batches)
        return
    # spawn: workers start clean whatever threads this process runs (tokenizer libraries, tqdm's monitor).
    # An executor, not multiprocessing.Pool: a worker that dies (killed, failed start) breaks it with an
    # error, where a Pool would wait or respawn forever.
    tokenizer = encoder.tokenizer
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                               (tokenizer.path, tokenizer.eos_token, encoder.dtype.str, encoder.keys, encoder.errors))
    pending = collections.deque()  # bounded: the input is read only as far as results are written
    try:
        for units in batches:
            pending.append(pool.submit(_encode_in_worker, units))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise DataError(f"a --workers process ended unexpectedly ({e}); retry with --workers 1") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_documents(reader: InputReader, writers: dict, tokenizer: BaseTokenizer, dtype, args) -> None:
    """Every record through ``reader.accept`` in input order (bad ones: --errors), its documents to the
    writers of its split."""
    start, tokens = time.time(), 0
    encoder = BatchEncoder(tokenizer, dtype, args.json_keys, args.errors)
    with contextlib.closing(encoded_batches(unit_batches(reader.units()), encoder, args.workers)) as encoded, \
            tqdm(desc="tokenize", unit="doc", disable=None) as bar:
        for records, ids, lengths in encoded:
            offsets = np.concatenate(([0], np.cumsum(lengths))).tolist()
            doc = 0
            for file_index, lineno, result, replaced in records:
                ordinal = reader.accept(file_index, lineno, result, replaced)
                if ordinal is None:
                    continue
                split = "val" if in_val(ordinal, args.seed, args.val_fraction) else "train"
                for key_index in result:
                    writers[key_index, split].add_document(ids[offsets[doc]:offsets[doc + 1]])
                    doc += 1
            tokens += len(ids)
            bar.update(len(lengths))
            bar.set_postfix_str(f"{tokens:,} tokens, {tokens / max(time.time() - start, 1e-9):,.0f} tokens/s",
                                refresh=False)


# -- the run ---------------------------------------------------------------------------------------------
def no_usable_text(reader: InputReader, key: str | None = None) -> DataError:
    left_out = [f"{s['path']} ({s['reason']})" for s in reader.skipped_files]
    if reader.bad_records:
        left_out.append(f"{reader.bad_records} bad record(s)")
    where = f" for --json-keys {key}" if key else " in the inputs"
    return DataError(f"no usable text{where}" + (f"; skipped {'; '.join(left_out)}" if left_out else ""))


def train_tokenizer(args, files, model_path: str, final_path: str) -> BaseTokenizer:
    print(f"training sentencepiece BPE tokenizer (vocab {args.vocab_size}) -> {final_path}")
    reader = InputReader(files, args.json_keys, args.split_paragraphs, args.errors, report=False)
    records = tqdm(reader.records(), desc="sample lines for the tokenizer", unit="doc", disable=None)
    lines, num_records = sample_training_lines(records, args.seed, args.val_fraction, TOKENIZER_TRAINING_LINES)
    if num_records == 0:
        raise no_usable_text(reader)
    if not lines:
        raise DataError(f"no training text for the tokenizer: all {num_records} record(s) went to val "
                        f"(--val-fraction {args.val_fraction}, --seed {args.seed}); add text, use "
                        "--split-paragraphs or lower --val-fraction")
    try:
        tokenizer = train_sentencepiece(lines, model_path, args.vocab_size, seed=args.seed,
                                        character_coverage=args.character_coverage)
    except ValueError as e:  # sentencepiece names its own flag; point at ours
        raise DataError(str(e).replace("--character_coverage", "--character-coverage")) from None
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the tokenizer has {tokenizer.vocab_size} pieces, not the --vocab-size {args.vocab_size} "
              "asked: the corpus supports no more BPE merges", file=sys.stderr)
    return tokenizer


def check_splits(args, reader: InputReader, key: str, writers: dict, key_index: int, several_keys: bool) -> None:
    train, val = writers[key_index, "train"].num_docs, writers[key_index, "val"].num_docs
    if train + val == 0:
        raise no_usable_text(reader, key if several_keys else None)
    if train == 0:
        raise DataError(f"all {val} document(s) went to val (--val-fraction {args.val_fraction}, --seed "
                        f"{args.seed}); add text, use --split-paragraphs or lower --val-fraction")
    if val == 0 and args.val_fraction > 0:
        warn(f"no document of {train} went to val (--val-fraction {args.val_fraction}, --seed {args.seed}): "
             "the val split is empty")


def prepare_datasets(args: argparse.Namespace) -> dict[str, dict]:
    """Prepare one dataset per --json-keys key; returns each key's stats (as in ``<prefix>.json``)."""
    start_time = time.time()
    keys, several = args.json_keys, len(args.json_keys) > 1
    prefixes = dataset_prefixes(args.output, keys)
    given = None
    if args.tokenizer:
        try:  # before reading the corpus
            given = load_tokenizer(args.tokenizer, args.eos_token)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        if given.eos_id < 0:
            raise DataError(f"tokenizer {args.tokenizer} has no EOS piece; documents need one")
    kind = given.kind if given else SENTENCEPIECE
    check_outputs(args, prefixes, kind, given.path if given else None)  # before anything is read
    files = collect_files(args.input, args.glob)
    if several and not all(is_json_input(f) for f in files):
        text_file = next(f for f in files if not is_json_input(f))
        raise DataError(f"{text_file}: a text input has no JSON keys; with several --json-keys every input must be "
                        "JSON lines (.jsonl, .json, optionally .gz)")

    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with Outputs(out_dir) as out:
        # 1. The tokenizer, stored with every dataset.
        first = prefixes[keys[0]]
        tokenizer = given or train_tokenizer(args, files, str(out.path(first + ".model")), first + ".model")
        for prefix in prefixes.values():
            if given and not _same_file(given.path, prefix + DATASET_TOKENIZER_SUFFIX[given.kind]):
                shutil.copyfile(given.path, out.path(prefix + DATASET_TOKENIZER_SUFFIX[given.kind]))
            elif not given and prefix != first:  # trained once, at the first prefix
                for suffix in (".model", ".vocab"):
                    shutil.copyfile(out.path(first + suffix), out.path(prefix + suffix))
        dtype = best_dtype(tokenizer.vocab_size)

        # 2. Documents, streamed into one writer per (key, split).
        reader = InputReader(files, keys, args.split_paragraphs, args.errors)
        with contextlib.ExitStack() as stack:
            writers = {(k, split): stack.enter_context(IndexedDatasetWriter(str(out.path(f"{prefix}_{split}")), dtype))
                       for k, prefix in enumerate(prefixes.values()) for split in SPLITS}
            write_documents(reader, writers, tokenizer, dtype, args)
            for k, key in enumerate(keys):
                check_splits(args, reader, key, writers, k, several)
        for s in reader.skipped_files:
            warn(f"skipping {s['path']}: {s['reason']}")
        reader.report_replaced()

        # 3. Stats, then everything moves into place at once.
        all_stats = {}
        for k, (key, prefix) in enumerate(prefixes.items()):
            json_key = key if any(is_json_input(f) for f in files) else None
            all_stats[key] = _stats(args, start_time, json_key, prefix, reader, tokenizer, given, dtype, writers, k)
            with open(out.path(prefix + ".json"), "w", encoding="utf-8") as f:
                json.dump(all_stats[key], f, indent=2)
                f.write("\n")
        out.commit()
    _remove_stale_tokenizers(prefixes, tokenizer.kind, given.path if given else None)
    return all_stats


def prepare(args: argparse.Namespace) -> dict:
    """``prepare_datasets`` for the usual single dataset: its stats (the first key's with several)."""
    return next(iter(prepare_datasets(args).values()))


def _remove_stale_tokenizers(prefixes: dict[str, str], kind: str, given_path: str | None) -> None:
    """After an --overwrite: a tokenizer file of the old dataset that the new one does not have."""
    for prefix in prefixes.values():
        keep = set(output_files(prefix, kind, given_path))
        for f in (prefix + s for s in TOKENIZER_COMPANIONS):
            if f not in keep and os.path.lexists(f) and not _same_file(given_path, f):
                os.remove(f)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Megatron's padding: the vocabulary size rounded up to a multiple of ``multiple``."""
    return -(-vocab_size // multiple) * multiple


def _stats(args, start_time, key, prefix, reader, tokenizer, given, dtype, writers, k) -> dict:
    file_name = os.path.basename(prefix) + DATASET_TOKENIZER_SUFFIX[tokenizer.kind]
    return {
        "stats_version": STATS_VERSION,
        "inputs": list(args.input),
        "json_key": key,
        "files_used": reader.files_used,
        "files_skipped": reader.skipped_files,
        "bad_records_skipped": reader.bad_records,
        "split_paragraphs": args.split_paragraphs,
        "errors": args.errors,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "split_rule": "record i is in val when int.from_bytes(blake2b(f'{seed}:{i}'.encode(), digest_size=8)"
                      ".digest(), 'big') / 2**64 < val_fraction",
        "character_coverage": None if given else args.character_coverage,
        "tokenizer": tokenizer_record(tokenizer, file_name),
        "tokenizer_model": os.path.abspath(os.path.join(os.path.dirname(prefix), file_name)),
        "tokenizer_source": os.path.abspath(args.tokenizer) if given else "trained",
        "requested_vocab_size": args.vocab_size,
        "vocab_size": tokenizer.vocab_size,
        "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
        "padded_vocab_size": padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        **{split: {"prefix": f"{prefix}_{split}", "docs": writers[k, split].num_docs,
                   "tokens": writers[k, split].num_tokens} for split in SPLITS},
        "elapsed_s": round(time.time() - start_time, 3),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_ufp4.data.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="text / JSON-lines files (.txt, .jsonl, .json, each optionally .gz) and/or directories "
                             "(searched recursively with --glob)")
    parser.add_argument("--output", required=True,
                        help="output prefix, e.g. data/shakespeare -> data/shakespeare_train.bin")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer",
                        help="a sentencepiece .model, a Hugging Face tokenizer.json or a directory holding one "
                             "(default: train a sentencepiece BPE of --vocab-size)")
    parser.add_argument("--eos-token", help="end-of-document token of --tokenizer (default: tokenizer_config.json's "
                                            "eos_token, else the one common end-of-text token in the vocabulary)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size to train (required without --tokenizer)")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of corpus characters that get their own piece; the rarest "
                             "rest are spelled with byte pieces")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON-lines keys holding the documents; several: one dataset per key at "
                             "<output>_<key> (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="expected share of records in val (decided per record by a seeded hash)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--glob", default="*.txt", help="file pattern inside directories (e.g. '*.jsonl.gz')")
    parser.add_argument("--split-paragraphs", action="store_true",
                        help="text files: one document per blank-line separated paragraph, not per file")
    parser.add_argument("--errors", choices=("stop", "skip", "replace", "strict"), default="stop",
                        help="a bad record (invalid JSON, missing key, invalid UTF-8): stop with its file and line "
                             "(strict: the same), skip it with a warning, or replace invalid UTF-8 with U+FFFD")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that parse JSON lines and tokenize (1: this process; up to the number of CPU "
                             "cores helps; the output is the same for any N)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                        help="record padded_vocab_size = vocab size rounded up to a multiple of N (Megatron's rule "
                             "and default). Megatron multiplies N by the tensor-parallel size: for TP > 1 give N "
                             "times TP to get its padded size")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset at --output (only once the new one is complete)")
    args = parser.parse_args(argv)
    args.errors = "stop" if args.errors == "strict" else args.errors
    if args.tokenizer is None:
        if args.eos_token is not None:
            parser.error("--eos-token applies to a given --tokenizer (a trained one ends documents with </s>)")
        if args.vocab_size is None:
            parser.error("--vocab-size is required unless --tokenizer is given")
        if args.vocab_size <= MIN_BYTE_FALLBACK_VOCAB:
            parser.error(f"--vocab-size must exceed {MIN_BYTE_FALLBACK_VOCAB} "
                         f"(256 byte pieces + unk/bos/eos come first)")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.make_vocab_size_divisible_by < 1:
        parser.error(f"--make-vocab-size-divisible-by must be >= 1, got {args.make_vocab_size_divisible_by}")
    bad_keys = [k for k in args.json_keys if not k or "/" in k or os.sep in k]
    if bad_keys or len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys must be distinct, non-empty and without '/': {' '.join(args.json_keys)}")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. a cluster job killed) unwinds like Ctrl-C, so temp files get removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        all_stats = prepare_datasets(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. unwritable output directory, disk full
        print(f"error: {e.strerror or e}: {e.filename or args.output}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: temp files removed, no partial dataset written", file=sys.stderr)
        return 130
    for stats in all_stats.values():
        for split in SPLITS:
            s = stats[split]
            print(f"wrote {s['prefix']}.bin/.idx: {s['docs']} docs, {s['tokens']} tokens")
        tokens = stats["train"]["tokens"] + stats["val"]["tokens"]
        print(f"vocab {stats['vocab_size']} (padded {stats['padded_vocab_size']}, {stats['dtype']}), tokenizer "
              f"{stats['tokenizer_model']}, stats {stats['train']['prefix'][:-len('_train')]}.json, "
              f"{stats['elapsed_s']:.1f}s ({tokens / max(stats['elapsed_s'], 1e-9):,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
