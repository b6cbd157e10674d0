"""Memory-mapped token datasets in Megatron-LM's format: ``<prefix>.bin`` + ``<prefix>.idx``.

We read and write the layout Megatron-LM's ``IndexedDataset`` uses (index magic ``MMIDIDX``),
so a corpus tokenized for Megatron-LM trains here as it is, and a corpus prepared here loads in
Megatron-LM; the files we write are byte for byte what its ``IndexedDatasetBuilder`` writes.

``.bin`` is every sequence's token ids concatenated, in order, as raw little-endian values of
one dtype; no header, so ``np.memmap(bin, dtype)`` is the flat token stream.

``.idx`` layout (all little-endian; S sequences, D document boundaries)::

    offset          size        field
    0               9           magic  b"MMIDIDX\\0\\0"
    9               8  uint64   version (= 1)
    17              1  uint8    dtype code of the .bin (DTYPE_CODES)
    18              8  uint64   S, the number of sequences
    26              8  uint64   D, the number of entries of document_indices
    34              4*S int32   sequence_lengths, in tokens
    34+4S           8*S int64   sequence_pointers: where each sequence starts in the .bin, in bytes
    34+12S          8*D int64   document_indices: sequence index where each document starts, then S

Our "documents" (``ds[i]``, ``doc_lengths``, what GPTDataset packs) are the format's sequences,
as in Megatron-LM's GPTDataset.  ``IndexedDatasetWriter`` writes one sequence per document, so
its ``document_indices`` is ``0, 1, ..., S``.  A multimodal dataset's per-sequence int8 mode
table may follow ``document_indices``; it is accepted and not used.

Older datasets prepared here use the earlier ``UFP4IDX`` index (recognised by its magic) and
still load: a 40-byte header ``<8sQQQQ`` (magic ``b"UFP4IDX\\0"``, version 1, dtype code
1 = uint16 / 2 = int32, number of documents N, number of tokens T), then int64 lengths[N] and
int64 token (not byte) offsets[N].  Only the new format is written.

Opening checks the index against the .bin in one vectorised pass: the sequences must tile the
.bin exactly, in order, so a damaged or mismatched pair is refused instead of silently reading
other sequences' tokens.
"""
from __future__ import annotations

import array
import json
import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# Megatron-LM's dtype codes (its DType enum).
DTYPE_CODES = {code: np.dtype(name).newbyteorder("<") for code, name in (
    (1, "uint8"), (2, "int8"), (3, "int16"), (4, "int32"), (5, "int64"), (6, "float64"), (7, "float32"),
    (8, "uint16"))}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
WRITE_DTYPES = tuple(d for d in DTYPE_CODES.values() if d.kind in "iu")  # token ids are integers
_MAX_SEQUENCE_LENGTH = np.iinfo(np.int32).max  # lengths are stored as int32

LEGACY_MAGIC = b"UFP4IDX\x00"
LEGACY_HEADER = struct.Struct("<8sQQQQ")  # magic, version, dtype code, num docs, num tokens
LEGACY_DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}

_CHUNK = 1 << 20  # sequences per step of the validation pass: bounded temporaries on huge indexes


def best_dtype(vocab_size: int | None) -> np.dtype:
    """The token dtype Megatron-LM's preprocessing picks for a ``vocab_size`` vocabulary
    (``DType.optimal_dtype``: uint16 below 65500 ids, else int32), so our files match its."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def temp_path(path: str) -> str:
    """Sibling temp name: same directory, so ``os.replace`` onto ``path`` is atomic."""
    return f"{path}.tmp.{os.getpid()}"


class IndexedDatasetWriter:
    """Streams documents to ``<prefix>.bin/.idx``; files appear only on ``finalize()``.

    Tokens go to the .bin as they come; only the per-document lengths stay in memory.  Use as
    a context manager: an exception (or Ctrl-C) inside the ``with`` block deletes the temp
    files, so an interrupted run never leaves a half-written dataset behind.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in WRITE_DTYPES:
            raise ValueError(f"unsupported token dtype {self.dtype}; use one of {[str(d) for d in WRITE_DTYPES]}")
        self._info = np.iinfo(self.dtype)
        self._lengths = array.array("q")  # 8 bytes per document, not a Python int each
        self._num_tokens = 0
        self._bin_tmp = temp_path(bin_path(prefix))
        self._idx_tmp = temp_path(idx_path(prefix))
        self._bin_file = open(self._bin_tmp, "wb")
        self._finalized = False

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"a document must be a 1-D token sequence, got shape {tokens.shape}")
        if tokens.size:
            if tokens.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
            if tokens.min() < self._info.min or tokens.max() > self._info.max:
                raise ValueError(f"token id out of range for {self.dtype}: [{tokens.min()}, {tokens.max()}]")
            if tokens.size > _MAX_SEQUENCE_LENGTH:
                raise ValueError(f"a document of {tokens.size} tokens is longer than the index's int32 "
                                 f"lengths allow ({_MAX_SEQUENCE_LENGTH})")
        self._bin_file.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(tokens.size))
        self._num_tokens += int(tokens.size)

    @property
    def num_docs(self) -> int:
        return len(self._lengths)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def finalize(self) -> None:
        """Write the index and atomically move both files into place."""
        self._bin_file.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype="<i8")
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[self.dtype], len(lengths), len(lengths) + 1))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype="<i8").tobytes())  # one sequence per document
        # .bin first, .idx last: a reader checks the .bin against the index.
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
    """Read-only view of ``<prefix>.bin/.idx``; ``ds[i]`` is sequence (document) i's token array.

    Everything is memory-mapped: arrays returned are read-only views (no copy); call ``.copy()``
    or ``.astype(...)`` before modifying.  ``sequence_lengths`` (alias ``doc_lengths``),
    ``sequence_pointers`` and ``document_indices`` are the index's arrays under Megatron-LM's
    names; ``doc_offsets`` (token offsets) is computed on each access.  Pickling stores only the
    prefix, so DataLoader workers started with "spawn" re-open the files instead of copying them.
    """

    def __init__(self, prefix: str, vocab_size: int | None = None):
        self.prefix = prefix
        self.vocab_size = vocab_size
        idx_file, bin_file = idx_path(prefix), bin_path(prefix)
        for path in (idx_file, bin_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        with open(idx_file, "rb") as f:
            head = f.read(max(HEADER.size, LEGACY_HEADER.size))
        self._pointers = self._offsets = self._document_indices = None
        if head.startswith(MAGIC):
            self.format = "MMIDIDX"
            self._open_megatron(idx_file, bin_file, head)
        elif head.startswith(LEGACY_MAGIC):
            self.format = "UFP4IDX"
            self._open_legacy(idx_file, bin_file, head)
        elif MAGIC.startswith(head) or LEGACY_MAGIC.startswith(head):
            raise ValueError(f"{idx_file}: truncated header ({len(head)} bytes)")
        else:
            raise ValueError(f"{idx_file}: not an indexed dataset index (magic {head[:len(MAGIC)]!r}, "
                             f"expected {MAGIC!r} or {LEGACY_MAGIC!r})")
        # mmap of an empty file is an error, so an empty dataset gets an empty array.
        self.tokens = (np.memmap(bin_file, dtype=self.dtype, mode="r") if self.num_tokens
                       else np.zeros(0, dtype=self.dtype))
        if vocab_size is not None:
            check_token_range(self, vocab_size)

    def _open_megatron(self, idx_file: str, bin_file: str, head: bytes) -> None:
        if len(head) < HEADER.size:
            raise ValueError(f"{idx_file}: truncated header ({len(head)} bytes, the header has {HEADER.size})")
        _, version, code, num_sequences, num_doc_indices = HEADER.unpack_from(head)
        self.dtype = _header_dtype(idx_file, version, code, DTYPE_CODES)
        expected = HEADER.size + 12 * num_sequences + 8 * num_doc_indices
        idx_size = os.path.getsize(idx_file)
        if idx_size not in (expected, expected + num_sequences):  # + an optional int8 mode per sequence
            raise ValueError(f"{idx_file}: size {idx_size} bytes != expected {expected} for {num_sequences} "
                             f"sequences and {num_doc_indices} document indices")
        index = np.memmap(idx_file, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(index, "<i4", num_sequences, HEADER.size)
        self._pointers = np.frombuffer(index, "<i8", num_sequences, HEADER.size + 4 * num_sequences)
        self._document_indices = np.frombuffer(index, "<i8", num_doc_indices, HEADER.size + 12 * num_sequences)
        bin_size = os.path.getsize(bin_file)
        check_tiling(idx_file, bin_file, self._pointers, self.sequence_lengths, self.dtype.itemsize, bin_size)
        check_document_indices(idx_file, self._document_indices, num_sequences)
        self.num_tokens = bin_size // self.dtype.itemsize

    def _open_legacy(self, idx_file: str, bin_file: str, head: bytes) -> None:
        if len(head) < LEGACY_HEADER.size:
            raise ValueError(f"{idx_file}: truncated header ({len(head)} bytes, the header has "
                             f"{LEGACY_HEADER.size})")
        _, version, code, num_docs, num_tokens = LEGACY_HEADER.unpack(head)
        self.dtype = _header_dtype(idx_file, version, code, LEGACY_DTYPE_CODES)
        expected = LEGACY_HEADER.size + 16 * num_docs
        if os.path.getsize(idx_file) != expected:
            raise ValueError(f"{idx_file}: size {os.path.getsize(idx_file)} bytes != expected {expected} "
                             f"for {num_docs} documents")
        bin_size = os.path.getsize(bin_file)
        if bin_size != num_tokens * self.dtype.itemsize:
            raise ValueError(f"{bin_file}: size {bin_size} bytes does not match {idx_file} "
                             f"({num_tokens} tokens of {self.dtype}); files from different runs?")
        index = np.memmap(idx_file, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(index, "<i8", num_docs, LEGACY_HEADER.size)
        self._offsets = np.frombuffer(index, "<i8", num_docs, LEGACY_HEADER.size + 8 * num_docs)
        check_tiling(idx_file, bin_file, self._offsets, self.sequence_lengths, 1, num_tokens, unit="token")
        self.num_tokens = int(num_tokens)

    @property
    def doc_lengths(self) -> np.ndarray:
        return self.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """Byte offset of each sequence in the .bin (computed for the older format)."""
        return self._pointers if self._offsets is None else self._offsets * self.dtype.itemsize

    @property
    def doc_offsets(self) -> np.ndarray:
        """Token offset of each sequence in the .bin; computed on each access (O(sequences))."""
        return self._offsets if self._pointers is None else self._pointers // self.dtype.itemsize

    @property
    def document_indices(self) -> np.ndarray:
        """Sequence index where each document starts, then the sequence count."""
        if self._document_indices is None:  # older format: one sequence per document
            return np.arange(len(self) + 1, dtype=np.int64)
        return self._document_indices

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (clipped to its end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document index {i} out of range for {n} documents")
        i %= n
        doc_len = int(self.sequence_lengths[i])
        if not 0 <= offset <= doc_len:
            raise IndexError(f"offset {offset} out of range for document {i} of length {doc_len}")
        end = doc_len if length is None else min(doc_len, offset + length)
        start = (int(self._offsets[i]) if self._pointers is None
                 else int(self._pointers[i]) // self.dtype.itemsize)
        return self.tokens[start + offset:start + end]

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])  # the token range was checked where the dataset was first opened

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, format={self.format}, docs={len(self)}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")


def _header_dtype(idx_file: str, version: int, code: int, codes: dict) -> np.dtype:
    if version != VERSION:
        raise ValueError(f"{idx_file}: unsupported index version {version}")
    if code not in codes:
        raise ValueError(f"{idx_file}: unknown dtype code {code}")
    return codes[code]


def check_tiling(idx_file: str, bin_file: str, starts, lengths, itemsize: int, end: int,
                 unit: str = "byte", chunk: int = _CHUNK) -> None:
    """The sequences of ``idx_file`` tile ``bin_file`` exactly, as the writers lay them out:
    lengths in ``[0, tokens of the .bin]``, the first sequence at 0, each next one where the
    previous ends, the last ending at ``end`` (the .bin's size in ``unit``s).  ``starts`` are
    in ``unit``s, ``lengths`` in tokens of ``itemsize`` units.  One vectorised pass in chunks;
    ``ValueError`` naming the first bad sequence otherwise (a damaged index would silently
    read other sequences' tokens, or past the end of the .bin)."""
    max_length = end // itemsize
    previous_end = 0
    for lo in range(0, len(lengths), chunk):
        part_starts = np.asarray(starts[lo:lo + chunk], dtype=np.int64)
        part_lengths = np.asarray(lengths[lo:lo + chunk], dtype=np.int64)
        # Overflow is possible only past a start or length out of range, which is reported first.
        part_ends = part_starts + part_lengths * itemsize
        expected = np.empty_like(part_starts)
        expected[0] = previous_end
        expected[1:] = part_ends[:-1]
        bad_length = (part_lengths < 0) | (part_lengths > max_length)
        bad_start = (part_starts < 0) | (part_starts > end)
        bad = np.flatnonzero(bad_length | bad_start | (part_starts != expected))
        if bad.size:
            k = int(bad[0])
            i, start = lo + k, int(part_starts[k])
            if bad_length[k]:
                detail = f"has length {int(part_lengths[k])} (the .bin holds {max_length} tokens)"
            elif bad_start[k]:
                detail = f"starts at {unit} {start}, outside the {end} {unit}s of the .bin"
            elif i == 0:
                detail = f"starts at {unit} {start}, not 0"
            else:
                detail = f"starts at {unit} {start}, but sequence {i - 1} ends at {unit} {int(expected[k])}"
            raise ValueError(f"{idx_file}: sequence {i} {detail}; the index is damaged")
        previous_end = int(part_ends[-1])
    if previous_end != end:
        raise ValueError(f"{idx_file}: the sequences end at {unit} {previous_end}, but {bin_file} holds {end} "
                         f"{unit}s; the index is damaged, or the files come from different runs")


def check_document_indices(idx_file: str, document_indices, num_sequences: int, chunk: int = _CHUNK) -> None:
    """``document_indices`` runs from sequence 0 to ``num_sequences`` without decreasing, as
    Megatron-LM requires (GPTDataset here does not use it; Megatron-LM's tools do)."""
    if len(document_indices) == 0:
        raise ValueError(f"{idx_file}: no document_indices (at least the final {num_sequences} is required); "
                         "the index is damaged")
    previous = 0
    for lo in range(0, len(document_indices), chunk):
        part = np.asarray(document_indices[lo:lo + chunk], dtype=np.int64)
        before = np.empty_like(part)
        before[0] = previous
        before[1:] = part[:-1]
        bad_mask = (part < before) | (part > num_sequences)
        bad_mask[0] |= lo == 0 and part[0] != 0
        bad = np.flatnonzero(bad_mask)
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"{idx_file}: document_indices[{lo + k}] = {int(part[k])} (after {int(before[k])}, "
                             f"of {num_sequences} sequences); the index is damaged")
        previous = int(part[-1])
    if previous != num_sequences:
        raise ValueError(f"{idx_file}: document_indices end at sequence {previous}, not at the sequence count "
                         f"{num_sequences}; the index is damaged")


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
    if tokens.dtype.kind in "iu":
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
            offsets = ds.doc_offsets
            doc = int(np.searchsorted(offsets, pos, side="right")) - 1
            raise ValueError(f"{bin_path(ds.prefix)}: token id {int(tokens[pos])} (document {doc}, token "
                             f"{pos - int(offsets[doc])}) is outside {name}={vocab_size}; the data "
                             f"was prepared with another tokenizer, or {name} is too small")
    if len(tokens):
        _store_range(ds, stat, lo_all, hi_all)
