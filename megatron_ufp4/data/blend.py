"""Weighted mixtures of Megatron-LM corpora, cut into train/valid/test the way Megatron-LM cuts them.

A blend is Megatron-LM's ``--data-path``: one prefix, or ``weight prefix`` pairs
(``[0.7, web, 0.3, code]`` or the string ``"0.7 web 0.3 code"``); weights are normalized to
sum to 1.  Each corpus appears once.

Split (``"969,30,1"``): the ratios are normalized and turned into book-ends
``0 = b0 <= b1 <= b2 <= b3 = 1``; split ``s`` of a corpus of ``N`` documents is the document
range ``[round(b_s * N), round(b_{s+1} * N))`` in stored order (Python's ``round``: half to even,
as Megatron-LM's).

Draws: the blend is an index ``i -> (corpus, sample of that corpus)`` built greedily: for
``i = 0, 1, ...`` it picks the corpus ``c`` with the largest ``weight_c * max(i, 1) - taken_c``
(``taken_c``: samples given to ``c`` before ``i``; the first corpus wins ties) and hands out its
next sample.  So after any ``n`` samples each corpus has had ``weight_c * n`` of them to within one
sample, the order depends on nothing but the weights, and sample ``i`` of the blend is a
function of ``i``: any data-parallel layout sees the same samples, and resuming at ``n``
consumed samples continues exactly.  Corpus ``c`` builds ``ceil(ceil(size * weight_c) * 1.005)``
samples (Megatron-LM's 0.5 % surplus) and the blend holds ``sum_c ceil(size * weight_c)``.
One corpus without a weight is used as it is (``size`` samples), as Megatron-LM does; several
without weights are one pass each, drawn in proportion to the samples each pass holds, and a run
may draw no more than they hold together.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .indexed_dataset import IndexedDataset
from .megatron_samples import SPLITS, MegatronGPTDataset

SURPLUS = 0.005  # Megatron-LM's mid-level dataset surplus: each corpus builds a few more samples than drawn


class BlendError(ValueError):
    """A malformed blend or split (one line naming the field and value)."""


@dataclass(frozen=True)
class Corpus:
    prefix: str
    weight: float | None  # normalized; None: no weight given (one corpus as it is, or weighted by its size)


def parse_blend(value, field: str = "data.path") -> list[Corpus]:
    """``value``: a prefix, a whitespace-separated string, or a list of prefixes / weight-prefix pairs."""
    items = value.split() if isinstance(value, str) else list(value)
    if not items:
        raise BlendError(f"{field}: empty; give a dataset prefix or weight-prefix pairs")
    items = [str(x) for x in items]
    weights = _weights(items)
    if weights is None:
        if len(items) > 1 and len(items) % 2 == 0 and any(_is_number(x) for x in items[::2]):
            raise BlendError(f"{field}: {value!r} mixes weights and prefixes; give 'weight prefix' pairs")
        corpora = [Corpus(p, None) for p in items]
    else:
        if any(w <= 0 or not math.isfinite(w) for w in weights):
            raise BlendError(f"{field}: weights {weights} must be finite and > 0 (leave a corpus out instead of 0)")
        total = sum(weights)
        corpora = [Corpus(p, w / total) for w, p in zip(weights, items[1::2])]
    seen = set()
    for c in corpora:  # one corpus twice would be counted under one name; give it the summed weight instead
        if c.prefix in seen:
            raise BlendError(f"{field}: {c.prefix} appears twice; list each corpus once")
        seen.add(c.prefix)
    return corpora


@dataclass(frozen=True)
class SplitSource:
    """Where one split's samples come from: its corpora and, per corpus, which documents."""
    name: str  # train / valid / test
    corpora: tuple[Corpus, ...]
    ratios: tuple[float, ...] | None  # the data.split ratios that cut each corpus; None: every document
    field: str = "data.path"  # the setting that named the corpora (for messages)


def split_sources(path, split: str, valid_path=None, test_path=None) -> dict[str, SplitSource]:
    """The sources of train/valid/test.  With ``valid_path`` or ``test_path`` the sets are separate
    corpora used whole (``path`` is then the training set); otherwise ``split`` cuts every corpus of
    ``path``.  A split with no source (no documents, or no path) is absent."""
    train = tuple(parse_blend(path, "data.path"))
    if valid_path is None and test_path is None:
        ratios = tuple(parse_split(split))
        return {name: SplitSource(name, train, ratios) for name, r in zip(SPLITS, ratios) if r > 0}
    out = {"train": SplitSource("train", train, None)}
    for name, value, field in (("valid", valid_path, "data.valid_path"), ("test", test_path, "data.test_path")):
        if value is not None:
            out[name] = SplitSource(name, tuple(parse_blend(value, field)), None, field)
    return out


def data_sources(path, split: str | None, valid_path=None, test_path=None) -> dict[str, SplitSource] | None:
    """The ``data.*`` settings as sources (None without ``data.path``: the run reads ``data.prefix``);
    a setting that would be ignored is refused."""
    separate = [k for k, v in (("valid_path", valid_path), ("test_path", test_path)) if v is not None]
    if path is None:
        unused = separate + (["split"] if split is not None else [])
        if unused:
            raise BlendError(f"data.{unused[0]}: only used with data.path (a data.prefix dataset has its own train "
                             "and val splits)")
        return None
    if separate and split is not None:
        raise BlendError(f"data.split and data.{separate[0]} exclude each other: cut data.path by data.split, or "
                         "name the sets (as Megatron-LM's --split and --valid-data-path)")
    return split_sources(path, split or "969,30,1", valid_path, test_path)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _weights(items: list[str]) -> list[float] | None:
    """The weights of a ``weight prefix ...`` list, or None when it is a list of prefixes."""
    if len(items) % 2 or not all(_is_number(x) for x in items[::2]):
        return None
    return [float(x) for x in items[::2]]


def parse_split(split: str, field: str = "data.split") -> list[float]:
    """``"969,30,1"`` -> normalized ``[train, valid, test]`` ratios (missing trailing ones are 0)."""
    parts = [p for p in re.split(r"[,/ ]+", str(split).strip()) if p]
    try:
        ratios = [float(p) for p in parts]
    except ValueError:
        raise BlendError(f"{field}: {split!r} is not comma-separated numbers, e.g. 969,30,1") from None
    if not 1 <= len(ratios) <= 3 or any(r < 0 or not math.isfinite(r) for r in ratios) or sum(ratios) <= 0:
        raise BlendError(f"{field}: {split!r} needs 1 to 3 non-negative ratios (train,valid,test), not all 0")
    ratios += [0.0] * (3 - len(ratios))
    total = sum(ratios)
    return [r / total for r in ratios]


def split_documents(ratios: list[float], num_docs: int) -> dict[str, np.ndarray]:
    """Document ids of each split (empty array: the split gets no documents)."""
    ends = np.concatenate([[0.0], np.cumsum(ratios)]).tolist()
    out = {}
    for name, lo, hi in zip(SPLITS, ends[:-1], ends[1:]):
        start, stop = int(round(lo * num_docs)), int(round(hi * num_docs))
        out[name] = np.arange(start, stop if hi > lo else start, dtype=np.int64)
    return out


def corpus_sizes(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """(samples drawn from each corpus at most, samples each corpus builds): Megatron-LM's counts."""
    drawn = [int(math.ceil(size * w)) for w in weights]
    built = [int(math.ceil(n * (1 + SURPLUS))) for n in drawn]
    return drawn, built


def blend_index(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus of each blend sample, its sample number within that corpus): the greedy rule above.

    Plain Python over a few floats per sample (about 0.3 s per million samples on one core):
    the choice at ``i`` depends on every choice before it, so it does not vectorise.
    """
    if len(weights) == 1:
        return np.zeros(size, dtype=np.int16), np.arange(size, dtype=np.int64)
    corpus = np.empty(size, dtype=np.int16)
    within = np.empty(size, dtype=np.int64)
    taken = [0] * len(weights)
    w = [float(x) for x in weights]
    rest = range(1, len(w))
    for i in range(size):
        scale = float(i) if i > 1 else 1.0
        best, best_error = 0, w[0] * scale - taken[0]
        for c in rest:
            error = w[c] * scale - taken[c]
            if error > best_error:
                best, best_error = c, error
        corpus[i] = best
        within[i] = taken[best]
        taken[best] += 1
    return corpus, within


class BlendedSamples:
    """Sample ``i`` of a mixture: ``datasets[corpus[i]][within[i]]`` (see the module docstring)."""

    def __init__(self, datasets: list, weights: list[float], size: int, names: list[str]):
        if len(datasets) != len(weights) or len(names) != len(weights):
            raise ValueError("one dataset, weight and name per corpus")
        self.datasets, self.weights, self.names = list(datasets), list(weights), list(names)
        self.seq_len = datasets[0].seq_len
        self.corpus, self.within = blend_index(weights, size)
        self.num_samples = size
        self._counted = (0, np.zeros(len(weights), dtype=np.int64))  # (n, counts of corpus[:n]): logs count on

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        c = int(self.corpus[i])
        return self.datasets[c][int(self.within[i])]

    def samples_by_corpus(self, n: int) -> dict[str, int]:
        """How many of the first ``n`` samples (wrapping past the end) each corpus gave."""
        full, rest = divmod(max(0, n), self.num_samples)
        counts = full * self._first(self.num_samples) + self._first(rest)
        return {name: int(k) for name, k in zip(self.names, counts)}

    def _first(self, n: int) -> np.ndarray:
        """Counts of ``corpus[:n]``, counting on from the last call's ``n`` (logged steps only move on)."""
        done, counts = self._counted
        if n < done:
            done, counts = 0, np.zeros_like(counts)
        for start in range(done, n, 1 << 22):  # bounded temporaries: bincount widens int16 to intp
            counts = counts + np.bincount(self.corpus[start:min(n, start + (1 << 22))], minlength=len(counts))
        if n != self.num_samples:
            self._counted = (n, counts)
        return counts

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} {w:.3g} ({len(d.documents)} documents)"
                          for n, w, d in zip(self.names, self.weights, self.datasets))
        return f"{self.num_samples} samples of {parts}"


def corpus_names(corpora) -> list[str]:
    """Short names for metrics: the prefixes' file names, or the whole prefixes where those repeat."""
    short = [c.prefix.rstrip("/").rsplit("/", 1)[-1] for c in corpora]
    return short if len(set(short)) == len(short) else [c.prefix for c in corpora]


def build_split(source: SplitSource, seq_len: int, seed: int, size: int, vocab_size: int | None = None):
    """The samples of one split as ``BlendedSamples`` (one corpus: its samples as they are).
    ``size``: samples the run will draw.  Megatron-LM's three cases: one corpus without a weight is
    built with ``size`` samples; weighted corpora (one or more) with the 0.5 % surplus; several
    without weights one pass each, weighted by those passes' samples, and the run may draw no more
    than they hold together (else one line)."""
    opened = []
    for c in source.corpora:
        ds = IndexedDataset(c.prefix, vocab_size=vocab_size)
        docs = (np.arange(len(ds), dtype=np.int64) if source.ratios is None
                else split_documents(list(source.ratios), len(ds))[source.name])
        if docs.size == 0 or int(np.asarray(ds.doc_lengths)[docs].sum()) < 2:
            cut = "" if source.ratios is None else f" after data.split cuts its {len(ds)} documents"
            raise BlendError(f"{source.field}: {c.prefix}: the {source.name} split holds {docs.size} documents{cut}"
                             ", no tokens to sample")
        opened.append((ds, docs))
    names = corpus_names(source.corpora)

    def samples(k: int, n: int | None) -> MegatronGPTDataset:
        ds, docs = opened[k]
        return MegatronGPTDataset(ds, seq_len, seed, n, documents=docs, split=source.name)

    weights = [c.weight for c in source.corpora]
    if weights[0] is not None:
        drawn, built = corpus_sizes(weights, size)
        return BlendedSamples([samples(k, n) for k, n in enumerate(built)], weights, sum(drawn), names)
    if len(opened) == 1:
        return BlendedSamples([samples(0, size)], [1.0], size, names)
    passes = [samples(k, None) for k in range(len(opened))]
    held = [len(d) for d in passes]
    if sum(held) < size:
        raise BlendError(f"{source.field}: one pass over the unweighted corpora holds {sum(held)} {source.name} "
                         f"samples, the run needs {size}: give weights (corpora are then repeated as needed) or "
                         "train for fewer steps")
    return BlendedSamples(passes, [n / sum(held) for n in held], size, names)
