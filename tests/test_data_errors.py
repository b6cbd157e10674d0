"""Damaged datasets are refused with one line naming the file: an .idx whose document table
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
    ("length_past_bin", "document 3 has length"), ("negative_length", "document 3 has length -5"),
    ("overflowing_length", "document 3 has length 4611686018427387904"),
    ("offset_past_bin", "document 10 starts at token"), ("negative_offset", "document 10 starts at token -7"),
    ("inconsistent_offsets", "document 10 starts at token"), ("short_lengths", "the documents hold"),
])
def test_damaged_idx_is_one_line_naming_it(shakespeare_prefix, tmp_path, damage, needle):
    from megatron_ufp4.data.indexed_dataset import HEADER, IndexedDataset

    prefix = _copy_dataset(shakespeare_prefix, tmp_path / "d")
    idx = Path(f"{prefix}_train.idx")
    raw = bytearray(idx.read_bytes())
    n = HEADER.unpack(raw[:HEADER.size])[3]
    lengths = np.frombuffer(bytes(raw), np.int64, n, HEADER.size).copy()
    offsets = np.frombuffer(bytes(raw), np.int64, n, HEADER.size + 8 * n).copy()
    if damage == "length_past_bin":
        lengths[3] += 10 ** 6
    elif damage == "negative_length":
        lengths[3] = -5
    elif damage == "overflowing_length":
        lengths[3] = 2 ** 62
    elif damage == "offset_past_bin":
        offsets[10] = 10 ** 9
    elif damage == "negative_offset":
        offsets[10] = -7
    elif damage == "inconsistent_offsets":
        offsets[10] += 1
    elif damage == "short_lengths":
        lengths[-1] -= 1
    raw[HEADER.size:] = lengths.tobytes() + offsets.tobytes()
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
