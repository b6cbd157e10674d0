"""Packed language-modelling samples over an IndexedDataset, and the batch sampler.

Packing (Megatron-style): the chosen documents are laid end to end (each already ends
with EOS) into one token stream per epoch.  Sample j of an epoch is the window
``stream[j*seq_len : j*seq_len + seq_len + 1]``: consecutive samples overlap by one token
so that every token is a label exactly once, and samples freely cross document
boundaries.  ``tokens = window[:-1]``, ``labels = window[1:]``.  An epoch holds
``(stream_len - 1) // seq_len`` samples; the few leftover tokens are dropped (each epoch
drops the same tail).

Order: global sample i lives in epoch ``i // samples_per_epoch``; inside an epoch the
samples are visited in ``np.random.Generator(PCG64(seed + epoch)).permutation`` order, so
the order depends only on (seed, dataset, seq_len) and any sample can be computed without
replaying the ones before it — which is what makes resuming from ``consumed_samples`` exact.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .indexed_dataset import IndexedDataset


class GPTDataset(torch.utils.data.Dataset):
    """Fixed-length next-token samples; ``ds[i] = {"tokens": (seq_len,), "labels": (seq_len,)}``.

    Args:
        indexed_dataset: the documents.
        seq_len: tokens per sample (each sample reads seq_len + 1 tokens).
        seed: base seed of the per-epoch sample permutation.
        num_epochs / num_samples: length of the dataset; give at most one.  ``num_samples``
            may end mid-epoch (the last epoch is then partially used).  Default: 1 epoch.
        documents: which documents to use and in which order (default: all, stored order);
            lets one .bin/.idx be split into train/val by document ranges.
        shuffle: False visits samples in stream order (e.g. for a deterministic eval).
    """

    def __init__(self, indexed_dataset: IndexedDataset, seq_len: int, seed: int = 0,
                 num_epochs: int | None = None, num_samples: int | None = None,
                 documents=None, shuffle: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_epochs is not None and num_samples is not None:
            raise ValueError("give num_epochs or num_samples, not both")
        self.indexed = indexed_dataset
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.documents = (np.arange(len(indexed_dataset), dtype=np.int64) if documents is None
                          else np.asarray(documents, dtype=np.int64))

        # Token position where each chosen document starts in the epoch stream.
        lengths = np.asarray(indexed_dataset.doc_lengths, dtype=np.int64)[self.documents]
        doc_starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=doc_starts[1:])
        self.tokens_per_epoch = int(doc_starts[-1])
        self.samples_per_epoch = max(0, (self.tokens_per_epoch - 1) // self.seq_len)
        if self.samples_per_epoch == 0:
            raise ValueError(f"{self.tokens_per_epoch} tokens cannot fill one sample of "
                             f"seq_len + 1 = {self.seq_len + 1} tokens")

        # sample -> (position in self.documents, offset inside that document) of its first
        # token; vectorised with searchsorted.  side="right" skips zero-length documents.
        sample_starts = np.arange(self.samples_per_epoch, dtype=np.int64) * self.seq_len
        self.sample_doc = np.searchsorted(doc_starts, sample_starts, side="right") - 1
        self.sample_offset = sample_starts - doc_starts[self.sample_doc]

        if num_samples is not None:
            if num_samples < 1:
                raise ValueError(f"num_samples must be >= 1, got {num_samples}")
            self.num_samples = int(num_samples)
        else:
            epochs = 1 if num_epochs is None else int(num_epochs)
            if epochs < 1:
                raise ValueError(f"num_epochs must be >= 1, got {epochs}")
            self.num_samples = epochs * self.samples_per_epoch
        self.num_epochs = math.ceil(self.num_samples / self.samples_per_epoch)
        self._epoch_order: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Within-epoch sample ids in the order epoch ``epoch`` visits them."""
        order = self._epoch_order.get(epoch)
        if order is None:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(self.seed + epoch))
                order = rng.permutation(self.samples_per_epoch)
            else:
                order = np.arange(self.samples_per_epoch)
            self._epoch_order[epoch] = order
        return order

    def stream_sample(self, j: int) -> np.ndarray:
        """The seq_len + 1 tokens of unshuffled sample ``j`` of an epoch (int64)."""
        pos, offset = int(self.sample_doc[j]), int(self.sample_offset[j])
        remaining = self.seq_len + 1
        pieces = []
        while remaining > 0:  # loop over the (few) documents the window spans
            piece = self.indexed.get(int(self.documents[pos]), offset, remaining)
            pieces.append(piece)
            remaining -= len(piece)
            pos, offset = pos + 1, 0
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        i %= self.num_samples
        epoch, k = divmod(i, self.samples_per_epoch)
        window = torch.from_numpy(self.stream_sample(int(self.epoch_order(epoch)[k])))
        return {"tokens": window[:-1], "labels": window[1:]}

    def __repr__(self) -> str:
        return (f"GPTDataset(docs={len(self.documents)}, seq_len={self.seq_len}, "
                f"samples={self.num_samples}, epochs={self.num_epochs}, seed={self.seed})")


class GlobalBatchSampler:
    """Yields, per global batch, the list of sample indices this data-parallel rank loads.

    Global batch b covers samples ``[start_b, start_b + global_batch_size)`` with
    ``start_b = consumed_samples + b * global_batch_size``; the GPTDataset already turns
    these consecutive indices into a shuffled order.  The batch is split across ranks:

    * ``"contiguous"``: rank r gets the r-th block of ``global_batch_size // dp_size``;
    * ``"interleaved"``: rank r gets every ``dp_size``-th index starting at r.

    Every rank yields the same number of lists, ranks' lists are disjoint and their union
    is the global batch (with ``drop_last=False`` the last lists may be short, even empty).
    ``consumed_samples`` counts samples of *all* ranks, may be any integer (resuming
    mid-batch works), and advances by one global batch as each list is handed out.  Usable
    as ``DataLoader(dataset, batch_sampler=sampler)``.  Note that a DataLoader prefetches,
    so checkpoint the trainer's own count (steps * global batch) and pass it back through
    ``load_state_dict``/the constructor on resume.
    """

    SHARDINGS = ("contiguous", "interleaved")

    def __init__(self, total_samples: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0, drop_last: bool = True,
                 sharding: str = "contiguous"):
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive "
                             f"multiple of dp_size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        if sharding not in self.SHARDINGS:
            raise ValueError(f"sharding must be one of {self.SHARDINGS}, got {sharding!r}")
        self.total_samples = int(total_samples)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.drop_last = drop_last
        self.sharding = sharding
        self.consumed_samples = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    def rank_slice(self, batch: np.ndarray) -> list[int]:
        """This rank's share of one global batch (any length, e.g. a last partial batch)."""
        if self.sharding == "interleaved":
            return batch[self.dp_rank::self.dp_size].tolist()
        return np.array_split(batch, self.dp_size)[self.dp_rank].tolist()

    def __iter__(self):
        while True:
            start = self.consumed_samples
            end = min(start + self.global_batch_size, self.total_samples)
            if end <= start or (self.drop_last and end - start < self.global_batch_size):
                return
            self.consumed_samples = end  # count before yielding: the batch is handed out
            yield self.rank_slice(np.arange(start, end))

    def __len__(self) -> int:
        """Global batches left from ``consumed_samples``."""
        left = max(0, self.total_samples - self.consumed_samples)
        if self.drop_last:
            return left // self.global_batch_size
        return math.ceil(left / self.global_batch_size)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if not 0 <= consumed <= self.total_samples:
            raise ValueError(f"consumed_samples {consumed} out of range [0, {self.total_samples}]")
        self.consumed_samples = consumed


# Alias: the name the data-pipeline spec uses.
SampleIterator = GlobalBatchSampler
