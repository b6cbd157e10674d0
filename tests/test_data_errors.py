"""Damaged datasets are refused with one line naming the file: an .idx whose sequence table
does not tile the .bin, token ids outside the model's vocabulary (checked when the trainer
opens its datasets)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

try:
    from .conftest import CONFIGS
except ImportError:
    from conftest import CONFIGS


# -- datasets ----------------------------------------------------------------------------------------
def _copy_dataset(prefix: str, dst: Path) -> str:
    for split in ("train", "val"):
        for ext in ("bin", "idx"):
            shutil.copy(f"{prefix}_{split}.{ext}", f"{dst}_{split}.{ext}")
    return str(dst)


@pytest.mark.parametrize("damage,needle", [
    ("length_past_bin", "sequence 3 has length"), ("negative_length", "sequence 3 has length -5"),
    ("int32_max_length", "sequence 3 has length 2147483647"),
    ("pointer_past_bin", "sequence 10 starts at byte 1000000000, outside"),
    ("negative_pointer", "sequence 10 starts at byte -7"),
    ("overflowing_pointer", "sequence 10 starts at byte 9223372036854775807, outside"),
    ("inconsistent_pointers", "sequence 10 starts at byte"), ("misaligned_pointer", "but sequence 9 ends at byte"),
    ("first_pointer_not_0", "sequence 0 starts at byte 2, not 0"), ("short_lengths", "the sequences end at byte"),
    ("document_index_past_end", "document_indices[5] = 1000000000"), ("document_indices_end_early", "not at the"),
])
def test_damaged_idx_is_one_line_naming_it(shakespeare_prefix, tmp_path, damage, needle):
    from megatron_ufp4.data.indexed_dataset import HEADER, IndexedDataset

    prefix = _copy_dataset(shakespeare_prefix, tmp_path / "d")
    idx = Path(f"{prefix}_train.idx")
    raw = bytearray(idx.read_bytes())
    n, num_doc_indices = HEADER.unpack_from(raw)[3:]
    lengths = np.frombuffer(bytes(raw), "<i4", n, HEADER.size).copy()
    pointers = np.frombuffer(bytes(raw), "<i8", n, HEADER.size + 4 * n).copy()
    document_indices = np.frombuffer(bytes(raw), "<i8", num_doc_indices, HEADER.size + 12 * n).copy()
    if damage == "length_past_bin":
        lengths[3] += 10 ** 6
    elif damage == "negative_length":
        lengths[3] = -5
    elif damage == "int32_max_length":
        lengths[3] = 2 ** 31 - 1
    elif damage == "pointer_past_bin":
        pointers[10] = 10 ** 9
    elif damage == "negative_pointer":
        pointers[10] = -7
    elif damage == "overflowing_pointer":  # pointer + length would wrap around in int64
        pointers[10] = 2 ** 63 - 1
    elif damage == "inconsistent_pointers":
        pointers[10] += 2
    elif damage == "misaligned_pointer":  # not a whole number of tokens
        pointers[10] += 1
    elif damage == "first_pointer_not_0":
        pointers[0] = 2
    elif damage == "short_lengths":
        lengths[-1] -= 1
    elif damage == "document_index_past_end":
        document_indices[5] = 10 ** 9
    elif damage == "document_indices_end_early":
        document_indices[-1] -= 1
    raw[HEADER.size:] = lengths.tobytes() + pointers.tobytes() + document_indices.tobytes()
    idx.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as info:
        IndexedDataset(f"{prefix}_train")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{idx}: ") and needle in msg, msg


def test_token_ids_outside_the_vocabulary_are_one_line(tmp_path):
    from megatron_ufp4.data.indexed_dataset import IndexedDataset, check_token_range, write_indexed_dataset

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 512, 300) for _ in range(20)]
    docs[7][5] = 700
    write_indexed_dataset(str(tmp_path / "d"), docs, np.uint16)
    ds = IndexedDataset(str(tmp_path / "d"))  # without a vocabulary size: not checked (as before)
    expected = (f"{tmp_path / 'd.bin'}: token id 700 (document 7, token 5) is outside model.vocab_size=512; the data "
                "was prepared with another tokenizer, or model.vocab_size is too small")
    for chunk in (1 << 26, 1000):  # the scan is chunked: the offending id may be anywhere in a chunk
        with pytest.raises(ValueError) as info:
            check_token_range(ds, 512, chunk=chunk)
        assert str(info.value) == expected
    with pytest.raises(ValueError, match="token id 700"):
        IndexedDataset(str(tmp_path / "d"), vocab_size=512)
    IndexedDataset(str(tmp_path / "d"), vocab_size=701)
    check_token_range(ds, 65536)  # uint16 ids are always < 65536: nothing to scan


def test_train_cli_refuses_token_ids_outside_the_vocabulary_at_start(tmp_path, tiny_overrides, capsys):
    """The trainer opens its datasets with model.vocab_size: one line before any step runs."""
    from megatron_ufp4 import train
    from megatron_ufp4.data.indexed_dataset import write_indexed_dataset

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 512, 200) for _ in range(10)]
    docs[3][17] = 600
    write_indexed_dataset(str(tmp_path / "d_train"), docs, np.uint16)
    write_indexed_dataset(str(tmp_path / "d_val"), docs[:2], np.uint16)
    run = tmp_path / "run"
    args = [*tiny_overrides("tiny_dense", run), f"data.prefix={tmp_path / 'd'}", "training.train_steps=1"]
    assert train.main([str(CONFIGS / "tiny_dense.yaml"), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: {tmp_path / 'd_train.bin'}: token id 600 (document 3, token 17) is outside "
                   "model.vocab_size=512; the data was prepared with another tokenizer, or model.vocab_size is "
                   "too small"], err
    assert not (run / "metrics.jsonl").exists()
