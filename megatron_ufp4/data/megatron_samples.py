"""Training samples laid out exactly as Megatron-LM's ``GPTDataset`` (megatron-core 0.16.1) lays them out.

Given the documents of one split (``documents``, Megatron's ``indexed_indices``), a sample length
``seq_len``, a ``seed`` and a requested ``num_samples``, three index arrays are built, all from one
``numpy.random.RandomState(seed)``, in this order:

* Epochs.  ``T`` is the token count of the chosen documents.  A sample reads ``seq_len + 1``
  tokens and the next one starts on the last of them, so ``N`` samples need ``N * seq_len + 1``
  tokens; the number of epochs ``E`` is the smallest ``E >= 1`` with ``E * T >= N * seq_len + 1``.
* Document index: the chosen document ids repeated ``E`` times and shuffled.  When ``E > 1`` and
  the last epoch contributes fewer than ``int(0.8 * samples_per_epoch)`` of the requested samples
  (``samples_per_epoch = (T - 1) // seq_len``; the last epoch contributes ``N`` minus the
  ``((E - 1) * T - 1) // seq_len`` samples the earlier epochs hold), that final epoch is kept
  apart: the first ``E - 1`` epochs are shuffled together, then the final epoch on its own, so
  the few samples drawn from it do not favour some documents over others.
* Sample index: the documents, in document-index order, form one token stream of ``E * T``
  tokens.  Sample ``j`` covers stream positions ``[j * seq_len, (j + 1) * seq_len]``.  Row
  ``j + 1`` holds (position in the document index, offset in that document) of the last token of
  sample ``j`` (zero-length documents are stepped over); row 0 is ``(0, 0)``.  There are
  ``(E * T - 1) // seq_len`` samples, so a final partial sample is dropped, except in the
  validation split with ``drop_last_partial_validation_sequence=False``, where it is kept (its
  count rounded up in float32 arithmetic, as Megatron's C++ helper does) and ends on the last
  token of the stream.
* Shuffle index: a permutation of the samples; with a separate final epoch, the samples before
  the final epoch's first one are shuffled among themselves, then the rest among themselves.

Item ``i`` is sample ``shuffle_index[i]``: its ``seq_len + 1`` tokens stitched across documents,
``tokens = window[:-1]`` and ``labels = window[1:]``.  A kept partial sample is padded: tokens with
0, labels with -100, which the losses ignore (Megatron pads with its pad id, then zeroes it and
masks it out of the loss).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

SPLITS = ("train", "valid", "test")
FINAL_EPOCH_THRESHOLD = 0.80
PAD_LABEL = -100  # ignore_index of the cross-entropy losses
INT32_MAX = np.iinfo(np.int32).max
_CHUNK = 1 << 22  # samples located per vectorised step: bounds the int64 temporaries


class MegatronIndices(NamedTuple):
    document_index: np.ndarray  # (E * len(documents),) document ids
    sample_index: np.ndarray  # (num samples + 1, 2): document-index position, token offset
    shuffle_index: np.ndarray  # (num samples,) permutation of the samples
    num_epochs: int
    tokens_per_epoch: int
    separate_final_epoch: bool


def count_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int | None) -> int:
    """Smallest number of epochs whose tokens hold ``num_samples`` windows (1 when None)."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_len + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """``documents`` repeated ``num_epochs`` times, shuffled (the final epoch apart if asked)."""
    if separate_final_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        return np.concatenate((first, build_document_index(documents, 1, rng, False)))
    dtype = np.int32 if documents.size == 0 or documents.max() <= INT32_MAX else np.int64
    document_index = np.tile(documents.astype(dtype), num_epochs)
    rng.shuffle(document_index)
    return document_index


def count_samples(num_epochs: int, tokens_per_epoch: int, seq_len: int, drop_last_partial_sequence: bool) -> int:
    stream_tail = num_epochs * tokens_per_epoch - 1  # the last token only ends a window
    if drop_last_partial_sequence:
        return stream_tail // seq_len
    # Megatron's helper rounds up in single precision; mirror it, it decides the sample count.
    return int(np.ceil(np.float32(stream_tail) / np.float32(seq_len)))


def build_sample_index(doc_lengths: np.ndarray, document_index: np.ndarray, seq_len: int, num_samples: int,
                       max_doc_length: int) -> np.ndarray:
    """Rows ``(document-index position, offset)`` of each sample's start and of the last one's end.

    ``doc_lengths`` are the lengths of every document id; ``max_doc_length`` (over the whole
    dataset) only picks the dtype, int32 where positions and offsets fit, as Megatron does.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)[document_index]
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)  # stream position of each document
    np.cumsum(lengths, out=starts[1:])
    num_positions, last_length = len(lengths), int(lengths[-1])
    del lengths  # the index can be hundreds of millions long: keep few copies alive
    dtype = np.int32 if max(len(document_index), max_doc_length) <= INT32_MAX else np.int64
    sample_index = np.zeros((num_samples + 1, 2), dtype=dtype)
    # Row j >= 1 locates stream token j * seq_len (sample j - 1 ends and sample j starts on it) in the
    # last document starting at or before it, never an empty one.  Document k thus holds rows
    # first_row[k] .. first_row[k + 1] - 1, first_row[k] being the first row whose token is at or
    # after the document's start: a repeat, no search per row.
    first_row = -(-starts // seq_len)
    np.clip(first_row, 1, num_samples + 1, out=first_row)
    inside = int(first_row[-1]) - 1  # rows whose token lies inside the stream
    rows_per_document = np.diff(first_row)
    del first_row
    sample_index[1:inside + 1, 0] = np.repeat(np.arange(num_positions, dtype=dtype), rows_per_document)
    del rows_per_document
    for lo in range(1, inside + 1, _CHUNK):
        rows = sample_index[lo:min(lo + _CHUNK, inside + 1)]
        ends = np.arange(lo, lo + len(rows), dtype=np.int64) * seq_len
        rows[:, 1] = ends - starts[rows[:, 0]]
    if inside < num_samples:
        # A kept partial sample (and any the float32 count adds) ends on the stream's last token.
        if last_length == 0:
            raise ValueError(f"document {int(document_index[-1])} is empty and ends the stream: a partial "
                             "last sample cannot end in it (megatron-core rejects this too)")
        sample_index[inside + 1:] = (num_positions - 1, last_length - 1)
    return sample_index


def build_shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """``[0, num_first)`` shuffled, followed by ``[num_first, total)`` shuffled."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    rest = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(rest)
    return np.concatenate((first, rest))


def build_megatron_indices(doc_lengths, documents, seq_len: int, seed: int, num_samples: int | None,
                           drop_last_partial_sequence: bool = True) -> MegatronIndices:
    """The document, sample and shuffle index of Megatron's GPTDataset over ``documents``."""
    doc_lengths = np.asarray(doc_lengths)
    documents = np.asarray(documents)
    tokens_per_epoch = int(doc_lengths[documents].sum(dtype=np.int64))
    if tokens_per_epoch == 0:
        raise ValueError(f"the {len(documents)} chosen documents hold no tokens")
    num_epochs = count_epochs(tokens_per_epoch, seq_len, num_samples)

    separate_final_epoch = False
    num_samples_before_final_epoch = 0
    if num_epochs > 1:
        num_samples_before_final_epoch = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_len
        samples_per_epoch = (tokens_per_epoch - 1) // seq_len
        samples_from_final_epoch = num_samples - num_samples_before_final_epoch
        separate_final_epoch = samples_from_final_epoch < int(FINAL_EPOCH_THRESHOLD * samples_per_epoch)

    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    total_samples = count_samples(num_epochs, tokens_per_epoch, seq_len, drop_last_partial_sequence)
    sample_index = build_sample_index(doc_lengths, document_index, seq_len, total_samples,
                                      int(doc_lengths.max()))
    num_first = num_samples_before_final_epoch if separate_final_epoch else total_samples
    shuffle_index = build_shuffle_index(num_first, total_samples, rng)
    return MegatronIndices(document_index, sample_index, shuffle_index, num_epochs, tokens_per_epoch,
                           separate_final_epoch)


class MegatronGPTDataset(torch.utils.data.Dataset):
    """Megatron GPTDataset's samples; ``ds[i] = {"tokens": (seq_len,), "labels": (seq_len,)}`` int64.

    Args:
        indexed_dataset: the documents (``doc_lengths`` and ``get(i, offset, length)`` are used).
        seq_len: tokens per sample (each sample reads seq_len + 1 tokens).
        seed: Megatron's ``random_seed``.
        num_samples: samples requested (Megatron's ``num_samples``); None means one epoch.
            ``len(ds)`` is the number of samples built, which is at least ``num_samples``: the
            whole epochs it takes, less the partial tail (as Megatron's ``__len__``).
        documents: the split's document ids (Megatron's ``indexed_indices``); default all.
        split: "train", "valid" or "test"; only "valid" honours
            ``drop_last_partial_validation_sequence`` (Megatron's config option, default True).
    """

    def __init__(self, indexed_dataset, seq_len: int, seed: int, num_samples: int | None, documents=None,
                 split: str = "train", drop_last_partial_validation_sequence: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        num_docs = len(indexed_dataset)
        documents = np.arange(num_docs, dtype=np.int64) if documents is None else np.asarray(documents)
        if documents.ndim != 1 or documents.size == 0 or not np.issubdtype(documents.dtype, np.integer):
            raise ValueError(f"documents must be a non-empty 1-D array of document ids, got {documents!r}")
        if documents.min() < 0 or documents.max() >= num_docs:
            raise ValueError(f"documents must lie in [0, {num_docs}), got ids {documents.min()}..{documents.max()}")
        self.indexed = indexed_dataset
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.documents = documents
        self.split = split
        self.drop_last_partial_sequence = split != "valid" or drop_last_partial_validation_sequence
        indices = build_megatron_indices(indexed_dataset.doc_lengths, documents, self.seq_len, self.seed,
                                         self.num_samples, self.drop_last_partial_sequence)
        self.document_index, self.sample_index, self.shuffle_index = indices[:3]
        self.num_epochs = indices.num_epochs
        self.tokens_per_epoch = indices.tokens_per_epoch
        self.separate_final_epoch = indices.separate_final_epoch

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def window(self, sample: int) -> np.ndarray:
        """Tokens of unshuffled sample ``sample`` (int64), seq_len + 1 of them unless it is partial."""
        (first, first_offset), (last, last_offset) = self.sample_index[sample], self.sample_index[sample + 1]
        first, last = int(first), int(last)
        pieces = []
        for position in range(first, last + 1):  # the few documents the window spans
            offset = int(first_offset) if position == first else 0
            length = int(last_offset) + 1 - offset if position == last else None
            pieces.append(self.indexed.get(int(self.document_index[position]), offset, length))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:  # Megatron indexes the shuffle index with i: negatives count from the end
            raise IndexError(f"sample {i} out of range for {n} samples")
        window = torch.from_numpy(self.window(int(self.shuffle_index[i])))
        if len(window) == self.seq_len + 1:
            return {"tokens": window[:-1], "labels": window[1:]}
        # The kept partial last sample of a validation split: as Megatron, pad the window, then
        # feed 0 for the padding and leave it out of the loss.
        tokens = torch.zeros(self.seq_len, dtype=torch.int64)
        labels = torch.full((self.seq_len,), PAD_LABEL, dtype=torch.int64)
        tokens[:len(window)] = window
        labels[:len(window) - 1] = window[1:]
        return {"tokens": tokens, "labels": labels}

    def __repr__(self) -> str:
        return (f"MegatronGPTDataset(docs={len(self.documents)}, seq_len={self.seq_len}, samples={len(self)}, "
                f"epochs={self.num_epochs}, seed={self.seed}, split={self.split!r})")
