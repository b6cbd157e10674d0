""".bin/.idx token datasets in Megatron-LM's MMIDIDX format: files Megatron-LM writes read here, files
written here are byte-identical to Megatron-LM's and read there, the older UFP4IDX files still read, and
damaged or mismatched files are refused with one line naming them.

Expected values come from the reference implementation (megatron-core's IndexedDatasetBuilder and
IndexedDataset) or from independent parses of the files (struct, numpy), not from the code under test.
"""
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from megatron_ufp4.data.indexed_dataset import (IndexedDataset, IndexedDatasetWriter, best_dtype,
                                                write_indexed_dataset)

# Megatron-LM's dtype codes, as its DType enum numbers them (checked against it below).
MEGATRON_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7,
                  "uint16": 8}
INTEGER_DTYPES = [name for name in MEGATRON_CODES if np.dtype(name).kind in "iu"]


@pytest.fixture(scope="module")
def mcore():
    """megatron-core's indexed_dataset module (it logs and warns about optional fused kernels on import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def random_docs(rng, n, high, max_len=40):
    docs = [rng.integers(0, high, size=rng.integers(0, max_len)) for _ in range(n)]
    docs[2] = docs[2][:0]  # always an empty document
    return docs


def build_with_megatron(mcore, prefix, docs, dtype_name, lengths=None):
    """Megatron-LM's writer: one add_document per document (its sequence lengths: one sequence unless given)."""
    import torch

    with warnings.catch_warnings():  # numpy 2 warns about how it converts the tensor
        warnings.simplefilter("ignore", DeprecationWarning)
        builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=getattr(np, dtype_name))
        for i, doc in enumerate(docs):
            builder.add_document(torch.from_numpy(np.asarray(doc)),
                                 lengths=[len(doc)] if lengths is None else lengths[i])
        builder.finalize(prefix + ".idx")


def open_with_megatron(mcore, prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mcore.IndexedDataset(prefix)


def test_dtype_codes_and_best_dtype_match_megatron(mcore):
    assert {d.name: d.value for d in mcore.DType} == MEGATRON_CODES
    for vocab_size in (None, 1, 512, 32000, 65499, 65500, 65535, 65536, 128256):
        assert best_dtype(vocab_size) == mcore.DType.optimal_dtype(vocab_size), vocab_size


def test_best_dtype_boundary():
    assert best_dtype(65499) == np.uint16  # Megatron-LM's threshold: uint16 below 65500 ids
    assert best_dtype(65500) == np.int32


@pytest.mark.parametrize("dtype_name", list(MEGATRON_CODES))
def test_reads_what_megatron_writes_in_every_dtype(mcore, tmp_path, dtype_name):
    rng = np.random.default_rng(MEGATRON_CODES[dtype_name])
    high = min(120, np.iinfo(dtype_name).max) if np.dtype(dtype_name).kind in "iu" else 50_000
    docs = [d.astype(dtype_name) for d in random_docs(rng, 30, high)]
    prefix = str(tmp_path / "mega")
    build_with_megatron(mcore, prefix, docs, dtype_name)

    ours, ref = IndexedDataset(prefix), open_with_megatron(mcore, prefix)
    assert ours.dtype == np.dtype(dtype_name) and len(ours) == len(ref) == len(docs)
    for i, doc in enumerate(docs):
        assert ours[i].dtype == np.dtype(dtype_name)
        np.testing.assert_array_equal(ours[i], ref[i])
        np.testing.assert_array_equal(ours[i], doc)
        offset = min(1, len(doc))
        np.testing.assert_array_equal(ours.get(i, offset, 3), ref.get(i, offset, min(3, len(doc) - offset)))
    np.testing.assert_array_equal(ours.sequence_lengths, ref.sequence_lengths)
    np.testing.assert_array_equal(ours.doc_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ours.sequence_pointers, ref.index.sequence_pointers)
    np.testing.assert_array_equal(ours.doc_offsets, ref.index.sequence_pointers // np.dtype(dtype_name).itemsize)
    np.testing.assert_array_equal(ours.document_indices, ref.document_indices)
    np.testing.assert_array_equal(ours.document_indices, np.arange(len(docs) + 1))
    assert ours.num_tokens == sum(len(d) for d in docs)


def test_several_sequences_per_document(mcore, tmp_path):
    rng = np.random.default_rng(1)
    sequence_lengths = [[3, 0, 5], [7], [0], [2, 2]]
    docs = [rng.integers(0, 1000, sum(lengths)) for lengths in sequence_lengths]
    prefix = str(tmp_path / "multi")
    build_with_megatron(mcore, prefix, docs, "int32", lengths=sequence_lengths)

    ours = IndexedDataset(prefix)
    np.testing.assert_array_equal(ours.document_indices, [0, 3, 4, 5, 7])
    np.testing.assert_array_equal(ours.sequence_lengths, [3, 0, 5, 7, 0, 2, 2])
    stream = np.concatenate(docs)
    np.testing.assert_array_equal(np.concatenate(list(ours)), stream)
    np.testing.assert_array_equal(ours[2], stream[3:8])
    np.testing.assert_array_equal(ours[-1], stream[-2:])


@pytest.mark.parametrize("dtype_name", INTEGER_DTYPES)
@pytest.mark.parametrize("num_docs", [0, 1, 40])
def test_writes_what_megatron_writes_byte_for_byte(mcore, tmp_path, dtype_name, num_docs):
    rng = np.random.default_rng(num_docs)
    docs = random_docs(rng, max(num_docs, 3), min(np.iinfo(dtype_name).max, 70_000))[:num_docs]
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
    write_indexed_dataset(ours, docs, dtype_name)
    build_with_megatron(mcore, ref, docs, dtype_name)
    for ext in (".bin", ".idx"):
        assert Path(ours + ext).read_bytes() == Path(ref + ext).read_bytes(), ext
    if sum(len(d) for d in docs):  # megatron-core cannot memory-map an empty .bin
        theirs = open_with_megatron(mcore, ours)
        assert len(theirs) == len(docs)
        for i, doc in enumerate(docs):
            np.testing.assert_array_equal(theirs[i], doc)
            assert theirs[i].dtype == np.dtype(dtype_name)
        np.testing.assert_array_equal(theirs.document_indices, np.arange(len(docs) + 1))
    assert len(IndexedDataset(ours)) == len(docs)


@pytest.mark.parametrize("vocab_size, expected_dtype", [(1000, np.uint16), (70000, np.int32)])
def test_round_trip_and_independent_parse(tmp_path, vocab_size, expected_dtype):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 25, vocab_size) + [np.array([vocab_size - 1, 0])]
    prefix = str(tmp_path / "ds")
    write_indexed_dataset(prefix, docs, best_dtype(vocab_size))

    ds = IndexedDataset(prefix)
    assert ds.dtype == expected_dtype and len(ds) == len(docs) and ds.format == "MMIDIDX"
    for i, doc in enumerate(docs):
        assert ds[i].dtype == expected_dtype
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    assert ds.num_tokens == sum(len(d) for d in docs)
    with pytest.raises(IndexError):
        ds[len(docs)]
    # Independent parse: .bin is the raw concatenation; .idx a 34-byte header, then the three arrays.
    stream = np.concatenate(docs)
    np.testing.assert_array_equal(np.fromfile(prefix + ".bin", dtype=expected_dtype), stream)
    raw = Path(prefix + ".idx").read_bytes()
    magic, version, code, num_sequences, num_doc_indices = struct.unpack_from("<9sQBQQ", raw)
    n = len(docs)
    assert (magic, version, num_sequences, num_doc_indices) == (b"MMIDIDX\0\0", 1, n, n + 1)
    assert code == MEGATRON_CODES[np.dtype(expected_dtype).name]
    lengths = np.array([len(d) for d in docs])
    np.testing.assert_array_equal(np.frombuffer(raw, "<i4", n, 34), lengths)
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * np.dtype(expected_dtype).itemsize
    np.testing.assert_array_equal(np.frombuffer(raw, "<i8", n, 34 + 4 * n), pointers)
    np.testing.assert_array_equal(np.frombuffer(raw, "<i8", n + 1, 34 + 12 * n), np.arange(n + 1))
    assert len(raw) == 34 + 20 * n + 8

    clone = pickle.loads(pickle.dumps(ds))  # by prefix: re-opened, not copied
    np.testing.assert_array_equal(clone[5], docs[5])
    assert len(pickle.dumps(ds)) < 200


def write_legacy(prefix, docs, code):
    """The older UFP4IDX layout, by hand: 40-byte header, int64 lengths, int64 token offsets."""
    dtype = {1: np.uint16, 2: np.int32}[code]
    lengths = np.array([len(d) for d in docs], dtype="<i8")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<i8")
    Path(prefix + ".bin").write_bytes(np.concatenate(docs).astype(dtype).tobytes())
    Path(prefix + ".idx").write_bytes(struct.pack("<8sQQQQ", b"UFP4IDX\0", 1, code, len(docs), int(lengths.sum()))
                                      + lengths.tobytes() + offsets.tobytes())


@pytest.mark.parametrize("code", [1, 2])
def test_legacy_ufp4idx_still_reads(tmp_path, code):
    rng = np.random.default_rng(code)
    docs = random_docs(rng, 20, 60000)
    prefix = str(tmp_path / "old")
    write_legacy(prefix, docs, code)
    ds = IndexedDataset(prefix)
    assert ds.format == "UFP4IDX" and ds.dtype == {1: np.uint16, 2: np.int32}[code] and len(ds) == len(docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds.get(0, 2, 3), docs[0][2:5])
    lengths = np.array([len(d) for d in docs])
    np.testing.assert_array_equal(ds.doc_lengths, lengths)
    np.testing.assert_array_equal(ds.doc_offsets, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    np.testing.assert_array_equal(ds.sequence_pointers, ds.doc_offsets * ds.dtype.itemsize)
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    assert ds.num_tokens == lengths.sum()


def test_writer_rejects_out_of_range_and_leaves_no_files(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        with IndexedDatasetWriter(str(tmp_path / "ds"), np.uint16) as writer:
            writer.add_document([1, 2, 3])
            writer.add_document([70000])
    with pytest.raises(ValueError, match="must be integers"):
        with IndexedDatasetWriter(str(tmp_path / "ds"), np.int32) as writer:
            writer.add_document([1.5])
    with pytest.raises(ValueError, match="unsupported token dtype float32"):
        IndexedDatasetWriter(str(tmp_path / "ds"), np.float32)
    assert os.listdir(tmp_path) == []  # aborted: temp files removed, nothing published


# -- damaged or mismatched files: one line naming the file -------------------------------------------------
def damage_header(raw: bytearray, damage: str) -> bytes:
    if damage == "truncated_header":
        return bytes(raw[:20])
    if damage == "truncated_magic":
        return bytes(raw[:5])
    if damage == "empty":
        return b""
    if damage == "bad_magic":
        raw[:9] = b"NOTANIDX\0"
    elif damage == "unknown_version":
        raw[9:17] = struct.pack("<Q", 2)
    elif damage == "unknown_dtype_code":
        raw[17] = 9
    elif damage == "more_sequences_than_stored":
        raw[18:26] = struct.pack("<Q", 11)
    elif damage == "truncated_arrays":
        return bytes(raw[:-3])
    return bytes(raw)


@pytest.mark.parametrize("damage, needle", [
    ("truncated_header", "truncated header (20 bytes, the header has 34)"),
    ("truncated_magic", "truncated header (5 bytes)"), ("empty", "truncated header (0 bytes)"),
    ("bad_magic", "not an indexed dataset index (magic b'NOTANIDX\\x00'"),
    ("unknown_version", "unsupported index version 2"), ("unknown_dtype_code", "unknown dtype code 9"),
    ("more_sequences_than_stored", "!= expected"), ("truncated_arrays", "!= expected"),
])
def test_damaged_header_is_one_line_naming_the_idx(tmp_path, damage, needle):
    prefix = str(tmp_path / "ds")
    write_indexed_dataset(prefix, [np.arange(10)] * 10, np.uint16)
    idx = Path(prefix + ".idx")
    idx.write_bytes(damage_header(bytearray(idx.read_bytes()), damage))
    with pytest.raises(ValueError) as info:
        IndexedDataset(prefix)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{idx}: ") and needle in msg, msg


def test_legacy_damage_is_one_line(tmp_path):
    prefix = str(tmp_path / "old")
    write_legacy(prefix, [np.arange(5)] * 4, 1)
    idx = Path(prefix + ".idx")
    raw = bytearray(idx.read_bytes())
    for damaged, needle in ((raw[:30], "truncated header (30 bytes, the header has 40)"),
                            (raw[:16] + struct.pack("<Q", 3) + raw[24:], "unknown dtype code 3")):
        idx.write_bytes(bytes(damaged))
        with pytest.raises(ValueError) as info:
            IndexedDataset(prefix)
        assert str(info.value).startswith(f"{idx}: ") and needle in str(info.value), info.value
    idx.write_bytes(bytes(raw))
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=r"\.bin: size 42 bytes does not match .*old\.idx \(20 tokens"):
        IndexedDataset(prefix)


def test_mismatched_bin_is_detected(tmp_path):
    prefix = str(tmp_path / "ds")
    write_indexed_dataset(prefix, [np.arange(10)], np.uint16)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError) as info:
        IndexedDataset(prefix)
    assert str(info.value) == (f"{prefix}.idx: the sequences end at byte 20, but {prefix}.bin holds 22 bytes; "
                               "the index is damaged, or the files come from different runs")
