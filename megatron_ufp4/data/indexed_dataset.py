"""Memory-mapped token datasets: ``<prefix>.bin`` (tokens) + ``<prefix>.idx`` (index).

``.bin`` is every document's token ids concatenated, in document order, as raw
little-endian values of one dtype (uint16 when the vocabulary has < 65536 entries,
else int32).  No header: ``np.memmap(bin, dtype)`` is the flat token stream.

``.idx`` layout (all little-endian)::

    offset  size        field
    0       8           magic  b"UFP4IDX\\0"
    8       8  uint64   version (= 1)
    16      8  uint64   dtype code (1 = uint16, 2 = int32; see DTYPE_CODES)
    24      8  uint64   number of documents N
    32      8  uint64   total number of tokens T (= size of .bin / itemsize)
    40      8*N int64   document lengths, in tokens
    40+8N   8*N int64   document start offsets into .bin, in tokens (not bytes)

The header is 40 bytes so both arrays stay 8-byte aligned and can be memory-mapped
directly.  T is stored so a reader can detect a .bin/.idx pair from different runs.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

MAGIC = b"UFP4IDX\x00"
VERSION = 1
HEADER = struct.Struct("<8sQQQQ")  # magic, version, dtype code, num docs, num tokens
DTYPE_CODES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """Smallest supported dtype that holds every token id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def temp_path(path: str) -> str:
    """Sibling temp name: same directory, so ``os.replace`` onto ``path`` is atomic."""
    return f"{path}.tmp.{os.getpid()}"


class IndexedDatasetWriter:
    """Streams documents to ``<prefix>.bin/.idx``; files appear only on ``finalize()``.

    Use as a context manager: an exception (or Ctrl-C) inside the ``with`` block deletes
    the temp files, so an interrupted run never leaves a half-written dataset behind.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {self.dtype}; use one of "
                             f"{sorted(str(d) for d in _CODE_OF_DTYPE)}")
        self._info = np.iinfo(self.dtype)
        self._doc_lengths: list[int] = []
        self._num_tokens = 0
        self._bin_tmp = temp_path(bin_path(prefix))
        self._idx_tmp = temp_path(idx_path(prefix))
        self._bin_file = open(self._bin_tmp, "wb")
        self._finalized = False

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"a document must be a 1-D token sequence, got shape {tokens.shape}")
        if tokens.size and (tokens.min() < self._info.min or tokens.max() > self._info.max):
            raise ValueError(f"token id out of range for {self.dtype}: "
                             f"[{tokens.min()}, {tokens.max()}]")
        self._bin_file.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._doc_lengths.append(int(tokens.size))
        self._num_tokens += int(tokens.size)

    @property
    def num_docs(self) -> int:
        return len(self._doc_lengths)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def finalize(self) -> None:
        """Write the index and atomically move both files into place."""
        self._bin_file.close()
        lengths = np.asarray(self._doc_lengths, dtype=np.int64)
        offsets = np.zeros_like(lengths)
        np.cumsum(lengths[:-1], out=offsets[1:])
        with open(self._idx_tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[self.dtype], len(lengths),
                                self._num_tokens))
            f.write(lengths.tobytes())
            f.write(offsets.tobytes())
        # .bin first, .idx last: a reader checks the .bin size against the .idx header.
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        self._finalized = True

    def abort(self) -> None:
        """Close and delete the temp files (no-op after ``finalize``)."""
        if self._finalized:
            return
        self._bin_file.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if not self._finalized:
                self.finalize()
        else:
            self.abort()
        return False


def write_indexed_dataset(prefix: str, documents, dtype) -> None:
    """Convenience: write an iterable of token sequences as one dataset."""
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)


class IndexedDataset:
    """Read-only view of ``<prefix>.bin/.idx``; ``ds[i]`` is document i's token array.

    Arrays returned are read-only slices of a memory map (no copy); call ``.copy()`` or
    ``.astype(...)`` before modifying.  Pickling stores only the prefix, so DataLoader
    workers started with "spawn" re-open the files instead of copying the data.
    """

    def __init__(self, prefix: str, vocab_size: int | None = None):
        self.prefix = prefix
        self.vocab_size = vocab_size
        idx_file, bin_file = idx_path(prefix), bin_path(prefix)
        for path in (idx_file, bin_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        with open(idx_file, "rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) < HEADER.size:
            raise ValueError(f"{idx_file}: truncated header")
        magic, version, dtype_code, num_docs, num_tokens = HEADER.unpack(raw)
        if magic != MAGIC:
            raise ValueError(f"{idx_file}: not a megatron_ufp4 index (bad magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"{idx_file}: unsupported index version {version}")
        if dtype_code not in DTYPE_CODES:
            raise ValueError(f"{idx_file}: unknown dtype code {dtype_code}")
        self.dtype = DTYPE_CODES[dtype_code]
        expected_idx_size = HEADER.size + 16 * num_docs
        if os.path.getsize(idx_file) != expected_idx_size:
            raise ValueError(f"{idx_file}: size {os.path.getsize(idx_file)} != expected "
                             f"{expected_idx_size} for {num_docs} documents")
        bin_size = os.path.getsize(bin_file)
        if bin_size != num_tokens * self.dtype.itemsize:
            raise ValueError(f"{bin_file}: size {bin_size} bytes does not match {idx_file} "
                             f"({num_tokens} tokens of {self.dtype}); files from different runs?")

        self.num_tokens = int(num_tokens)
        if num_docs:
            self.doc_lengths = np.memmap(idx_file, dtype=np.int64, mode="r",
                                         offset=HEADER.size, shape=(num_docs,))
            self.doc_offsets = np.memmap(idx_file, dtype=np.int64, mode="r",
                                         offset=HEADER.size + 8 * num_docs, shape=(num_docs,))
        else:
            self.doc_lengths = np.zeros(0, dtype=np.int64)
            self.doc_offsets = np.zeros(0, dtype=np.int64)
        check_index(idx_file, self.doc_lengths, self.doc_offsets, self.num_tokens)
        # mmap of an empty file is an error, so an empty dataset gets an empty array.
        self.tokens = (np.memmap(bin_file, dtype=self.dtype, mode="r") if num_tokens
                       else np.zeros(0, dtype=self.dtype))
        if vocab_size is not None:
            check_token_range(self, vocab_size)

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``i`` (clipped to its end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document index {i} out of range for {n} documents")
        i %= n
        doc_len = int(self.doc_lengths[i])
        if not 0 <= offset <= doc_len:
            raise IndexError(f"offset {offset} out of range for document {i} of length {doc_len}")
        end = doc_len if length is None else min(doc_len, offset + length)
        start = int(self.doc_offsets[i])
        return self.tokens[start + offset:start + end]

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])  # the token range was checked where the dataset was first opened

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, docs={len(self)}, tokens={self.num_tokens}, "
                f"dtype={self.dtype})")


def check_index(idx_file: str, lengths: np.ndarray, offsets: np.ndarray, num_tokens: int) -> None:
    """The document table of ``idx_file`` tiles the .bin exactly, as ``IndexedDatasetWriter``
    writes it: lengths >= 0, offset 0 first, each document starting where the previous one
    ends, the last ending at ``num_tokens``.  One vectorised pass; ``ValueError`` naming the
    first bad document otherwise (a damaged index would silently read other documents'
    tokens, or past the end of the .bin)."""
    n = len(lengths)
    if n == 0:
        if num_tokens:
            raise ValueError(f"{idx_file}: no documents, but the header counts {num_tokens} tokens")
        return
    lengths, offsets = np.asarray(lengths), np.asarray(offsets)
    bad = np.flatnonzero((lengths < 0) | (lengths > num_tokens))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{idx_file}: document {i} has length {int(lengths[i])} (the dataset has {num_tokens} "
                         "tokens); the index is damaged")
    bad = np.flatnonzero((offsets < 0) | (offsets > num_tokens))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{idx_file}: document {i} starts at token {int(offsets[i])}, outside the "
                         f"{num_tokens} tokens of the .bin; the index is damaged")
    # all values are now in [0, num_tokens]: these int64 sums cannot overflow
    expected = np.empty(n, dtype=np.int64)
    expected[0] = 0
    np.cumsum(lengths[:-1], out=expected[1:])
    bad = np.flatnonzero(offsets != expected)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{idx_file}: document {i} starts at token {int(offsets[i])}, but the documents before "
                         f"it end at {int(expected[i])}; the index is damaged")
    end = int(expected[-1]) + int(lengths[-1])
    if end != num_tokens:
        raise ValueError(f"{idx_file}: the documents hold {end} tokens, the header and the .bin {num_tokens}; "
                         "the index is damaged")


def _range_cache(ds: IndexedDataset) -> str:
    return bin_path(ds.prefix) + ".range.json"


def _cached_range(ds: IndexedDataset, stat) -> tuple[int, int] | None:
    try:
        with open(_range_cache(ds), encoding="utf-8") as f:
            c = json.load(f)
        if c["size"] == stat.st_size and c["mtime_ns"] == stat.st_mtime_ns:
            return int(c["min"]), int(c["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _store_range(ds: IndexedDataset, stat, lo: int, hi: int) -> None:
    """Best effort (the data directory may be read-only): later starts skip the scan."""
    path = _range_cache(ds)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "min": lo, "max": hi}, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def check_token_range(ds: IndexedDataset, vocab_size: int, name: str = "model.vocab_size",
                      chunk: int = 1 << 26) -> None:
    """Every token id of ``ds`` is in ``[0, vocab_size)``; else ``ValueError`` naming the .bin,
    the first offending id, where it is, and ``name``.  A vectorised min/max over the memory
    map, in chunks of ``chunk`` tokens (bounded memory), once per .bin: the range is cached
    next to it (``<prefix>.bin.range.json``, keyed by size and mtime), so restarts and other
    ranks read one small file.  Skipped when the dtype cannot hold an id >= vocab_size."""
    tokens = ds.tokens
    info = np.iinfo(tokens.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return
    stat = os.stat(bin_path(ds.prefix))
    cached = _cached_range(ds, stat)
    if cached is not None and cached[0] >= 0 and cached[1] < vocab_size:
        return
    lo_all, hi_all = 0, -1
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start:start + chunk])
        lo, hi = int(part.min()), int(part.max())
        lo_all, hi_all = (lo, hi) if hi_all < 0 else (min(lo_all, lo), max(hi_all, hi))
        if lo < 0 or hi >= vocab_size:
            pos = start + int(np.flatnonzero((part < 0) | (part >= vocab_size))[0])
            doc = int(np.searchsorted(ds.doc_offsets, pos, side="right")) - 1
            raise ValueError(f"{bin_path(ds.prefix)}: token id {int(tokens[pos])} (document {doc}, token "
                             f"{pos - int(ds.doc_offsets[doc])}) is outside {name}={vocab_size}; the data "
                             f"was prepared with another tokenizer, or {name} is too small")
    if len(tokens):
        _store_range(ds, stat, lo_all, hi_all)
