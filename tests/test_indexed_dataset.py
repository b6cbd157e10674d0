""".bin/.idx token datasets: round trip, dtype choice, damaged or mismatched files.

Expected values come from independent parses of the files (struct, numpy), not from the code under test.
"""
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_ufp4.data.indexed_dataset import (IndexedDataset, IndexedDatasetWriter, best_dtype,
                                                write_indexed_dataset)


def random_docs(rng, n, high, max_len=40):
    return [rng.integers(0, high, size=rng.integers(0, max_len)) for _ in range(n)]


@pytest.mark.parametrize("vocab_size, expected_dtype", [(1000, np.uint16), (70000, np.int32)])
def test_indexed_dataset_round_trip(tmp_path, vocab_size, expected_dtype):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 25, vocab_size) + [np.array([vocab_size - 1, 0])]
    prefix = str(tmp_path / "ds")
    write_indexed_dataset(prefix, docs, best_dtype(vocab_size))

    ds = IndexedDataset(prefix)
    assert ds.dtype == expected_dtype and len(ds) == len(docs)
    for i, doc in enumerate(docs):
        assert ds[i].dtype == expected_dtype
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.doc_lengths, [len(d) for d in docs])
    assert ds.num_tokens == sum(len(d) for d in docs)
    # Independent parse of the files: .bin is the raw concatenation, .idx header + arrays.
    stream = np.concatenate(docs)
    np.testing.assert_array_equal(np.fromfile(prefix + ".bin", dtype=expected_dtype), stream)
    raw = Path(prefix + ".idx").read_bytes()
    magic, version, code, num_docs, num_tokens = struct.unpack_from("<8sQQQQ", raw)
    assert (magic, version, num_docs, num_tokens) == (b"UFP4IDX\0", 1, len(docs), len(stream))
    assert code == (1 if expected_dtype == np.uint16 else 2)
    arrays = np.frombuffer(raw, dtype="<i8", offset=40)
    lengths = np.array([len(d) for d in docs])
    np.testing.assert_array_equal(arrays[:len(docs)], lengths)
    np.testing.assert_array_equal(arrays[len(docs):], np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_best_dtype_boundary():
    assert best_dtype(65535) == np.uint16
    assert best_dtype(65536) == np.int32


def test_writer_rejects_out_of_range_and_leaves_no_files(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        with IndexedDatasetWriter(str(tmp_path / "ds"), np.uint16) as writer:
            writer.add_document([1, 2, 3])
            writer.add_document([70000])
    assert os.listdir(tmp_path) == []  # aborted: temp files removed, nothing published


def test_mismatched_bin_is_detected(tmp_path):
    prefix = str(tmp_path / "ds")
    write_indexed_dataset(prefix, [np.arange(10)], np.uint16)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="does not match"):
        IndexedDataset(prefix)
