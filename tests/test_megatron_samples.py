"""MegatronGPTDataset against megatron-core's own GPTDataset: index arrays and every sample's tokens.

The same random documents (empty, short and long ones) are written twice: with megatron-core's
``IndexedDatasetBuilder`` for its ``GPTDataset`` and with our ``write_indexed_dataset`` for ours.
"""
import types
import warnings

import numpy as np
import pytest

from megatron_ufp4.data.indexed_dataset import IndexedDataset, write_indexed_dataset
from megatron_ufp4.data.megatron_samples import (PAD_LABEL, MegatronGPTDataset, build_megatron_indices,
                                                 build_sample_index, count_samples)

NUM_DOCS = 400


@pytest.fixture(scope="module")
def mc():
    """megatron-core's dataset modules (its import warns that Transformer Engine / Apex are missing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return types.SimpleNamespace(
            gpt=pytest.importorskip("megatron.core.datasets.gpt_dataset"),
            indexed=pytest.importorskip("megatron.core.datasets.indexed_dataset"),
            helpers=pytest.importorskip("megatron.core.datasets.helpers"),
            utils=pytest.importorskip("megatron.core.datasets.utils"))


def random_documents(rng, num_docs):
    kind = rng.choice(3, size=num_docs, p=[0.15, 0.7, 0.15])  # empty, short, long
    lengths = np.where(kind == 0, 0, np.where(kind == 1, rng.integers(1, 40, num_docs),
                                              rng.integers(100, 400, num_docs)))
    return [rng.integers(1, 50000, n).astype(np.uint16) for n in lengths]


@pytest.fixture(scope="module")
def corpus(mc, tmp_path_factory):
    """(megatron-core prefix, our IndexedDataset, documents) over the same documents."""
    import torch

    docs = random_documents(np.random.default_rng(7), NUM_DOCS)
    root = tmp_path_factory.mktemp("megatron_samples")
    theirs = str(root / "theirs")
    builder = mc.indexed.IndexedDatasetBuilder(mc.indexed.get_bin_path(theirs), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(mc.indexed.get_idx_path(theirs))
    write_indexed_dataset(str(root / "ours"), docs, np.uint16)
    return theirs, IndexedDataset(str(root / "ours")), docs


class StubTokenizer:
    """What GPTDataset reads of a tokenizer: eod, pad (distinct, so -1 stays the pad id), vocab size."""
    eod, pad, vocab_size = 0, -1, None
    unique_identifiers = {"class": "StubTokenizer"}


def megatron_dataset(mc, prefix, cache_dir, indexed_indices, num_samples, seq_len, seed, split="train",
                     drop_last_partial_validation_sequence=True):
    config = mc.gpt.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=([prefix], None), split="969,30,1",
        tokenizer=StubTokenizer(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(cache_dir),  # a fresh directory per test: the indices are always built, never loaded
        drop_last_partial_validation_sequence=drop_last_partial_validation_sequence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mc.gpt.GPTDataset(mc.indexed.IndexedDataset(prefix), prefix, np.asarray(indexed_indices, np.int32),
                                 num_samples, getattr(mc.utils.Split, split), config)


def split_range(mc, split):
    """Document ids of ``split`` ("train"/"valid") under ``969,30,1``, as megatron-core's builder cuts them."""
    config = mc.gpt.GPTDatasetConfig(random_seed=0, sequence_length=8, blend=(["x"], None), split="969,30,1",
                                      tokenizer=StubTokenizer(), reset_position_ids=False,
                                      reset_attention_mask=False, eod_mask_loss=False)
    lo, hi = config.split_matrix[getattr(mc.utils.Split, split).value]
    return np.arange(int(round(lo * NUM_DOCS)), int(round(hi * NUM_DOCS)))


def assert_same_as_megatron(ours, theirs):
    assert ours.document_index.dtype == theirs.document_index.dtype
    assert ours.sample_index.dtype == theirs.sample_index.dtype
    assert ours.shuffle_index.dtype == theirs.shuffle_index.dtype
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        text, _ = theirs._query_document_sample_shuffle_indices(i)
        item = ours[i]
        np.testing.assert_array_equal(np.append(item["tokens"].numpy(), item["labels"][-1].item()), text)


# (seq_len, seed, num_samples as a function of the split's samples per epoch, document range, split,
#  expected epochs, expected separate final epoch)
CASES = {
    "one_epoch": (16, 1, lambda per_epoch: per_epoch // 3, "all", "train", 1, False),
    "one_epoch_by_default": (23, 2, lambda per_epoch: None, "all", "train", 1, False),
    "exactly_one_epoch": (16, 3, lambda per_epoch: per_epoch, "all", "train", 1, False),
    "final_epoch_needs_many": (16, 4, lambda per_epoch: 2 * per_epoch + int(0.9 * per_epoch), "all", "train",
                               3, False),
    "final_epoch_needs_few": (16, 5, lambda per_epoch: 2 * per_epoch + 3, "all", "train", 3, True),
    "final_epoch_at_threshold": (9, 6, lambda per_epoch: per_epoch + int(0.8 * per_epoch), "all", "train",
                                 2, False),
    "final_epoch_below_threshold": (9, 6, lambda per_epoch: per_epoch + int(0.8 * per_epoch) - 1, "all",
                                    "train", 2, True),
    "train_split_of_969_30_1": (31, 8, lambda per_epoch: 3 * per_epoch + per_epoch // 10, "train", "train", 4, True),
    "valid_split": (12, 9, lambda per_epoch: 5 * per_epoch // 2, "valid", "valid", 3, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_indices_and_samples_equal_megatron_core(case, mc, corpus, tmp_path):
    seq_len, seed, requested, doc_range, split, epochs, separate = CASES[case]
    prefix, indexed, _ = corpus
    documents = np.arange(NUM_DOCS) if doc_range == "all" else split_range(mc, doc_range)
    per_epoch = (int(indexed.doc_lengths[documents].sum()) - 1) // seq_len
    num_samples = requested(per_epoch)
    ours = MegatronGPTDataset(indexed, seq_len, seed, num_samples, documents=documents, split=split)
    assert (ours.num_epochs, ours.separate_final_epoch) == (epochs, separate)  # the case is the one named
    assert len(ours) >= (num_samples or 0)
    theirs = megatron_dataset(mc, prefix, tmp_path, documents, num_samples, seq_len, seed, split)
    assert_same_as_megatron(ours, theirs)
    # Megatron indexes its shuffle index with the sample number: negatives count from the end.
    np.testing.assert_array_equal(ours[-1]["labels"].numpy(), theirs._query_document_sample_shuffle_indices(-1)[0][1:])
    for beyond in (len(ours), -len(ours) - 1):
        with pytest.raises(IndexError):
            theirs._query_document_sample_shuffle_indices(beyond)
        with pytest.raises(IndexError, match=str(beyond)):
            ours[beyond]


def test_kept_partial_validation_sample_is_padded_as_megatron_pads_it(mc, corpus, tmp_path):
    prefix, indexed, docs = corpus
    documents = np.array([d for d in split_range(mc, "valid") if len(docs[d])])  # the stream cannot end empty
    seq_len, seed = 13, 11
    tokens_per_epoch = int(indexed.doc_lengths[documents].sum())
    assert (2 * tokens_per_epoch - 1) % seq_len  # a partial last sample exists
    num_samples = (2 * tokens_per_epoch - 1) // seq_len
    ours = MegatronGPTDataset(indexed, seq_len, seed, num_samples, documents=documents, split="valid",
                              drop_last_partial_validation_sequence=False)
    theirs = megatron_dataset(mc, prefix, tmp_path, documents, num_samples, seq_len, seed, "valid",
                              drop_last_partial_validation_sequence=False)
    assert len(ours) == num_samples + 1
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    partial = int(np.flatnonzero(ours.shuffle_index == num_samples)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A full sample first: megatron-core caches the loss mask of its first item after masking that
        # item's padding in place, so a padded first item would mask later items' tokens too.
        for i in (0, partial):
            item, reference = ours[i], theirs[i]
            np.testing.assert_array_equal(item["tokens"].numpy(), reference["tokens"].numpy())
            kept = reference["loss_mask"].numpy() > 0
            np.testing.assert_array_equal(item["labels"].numpy()[kept], reference["labels"].numpy()[kept])
            assert (item["labels"].numpy()[~kept] == PAD_LABEL).all()
    assert (ours[partial]["labels"] == PAD_LABEL).any()


def test_sample_index_equals_megatron_helper_on_random_streams(mc):
    """Many small streams (empty documents first, last, in runs), both partial-sample settings, and the
    large streams where megatron-core's float32 sample count differs from the exact ceiling."""
    rng = np.random.default_rng(3)
    streams = []
    for _ in range(200):
        sizes = rng.integers(0, 30, int(rng.integers(1, 25))).astype(np.int32) * (rng.random(1) < 0.9)
        sizes[rng.integers(len(sizes))] += 1
        document_index = rng.integers(0, len(sizes), int(rng.integers(1, 3 * len(sizes) + 1))).astype(np.int32)
        if sizes[document_index].sum() > 1:
            streams.append((sizes, document_index, int(rng.integers(2, 40))))
    for seq_len, stream_tail, float32_excess in [(4096, 4096 * 5000 + 1, -1), (3001, 3001 * 5603, 1)]:
        exact = -(-stream_tail // seq_len)
        assert count_samples(1, stream_tail + 1, seq_len, False) == exact + float32_excess
        streams.append((np.array([stream_tail - 4, 5], np.int32), np.array([0, 1], np.int32), seq_len))
    for sizes, document_index, seq_len in streams:
        tokens = int(sizes[document_index].sum())
        for drop_last in (True, False):
            if not drop_last and sizes[document_index[-1]] == 0:
                continue  # megatron-core rejects it (a negative offset); so do we
            reference = mc.helpers.build_sample_idx(sizes, document_index, seq_len, 1, tokens, drop_last, True)
            ours = build_sample_index(sizes, document_index, seq_len, count_samples(1, tokens, seq_len, drop_last),
                                      int(sizes.max()))
            assert ours.dtype == reference.dtype
            np.testing.assert_array_equal(ours, reference)


def test_ten_million_samples_build_at_once():
    lengths = np.random.default_rng(0).integers(0, 2000, 170_000)
    seq_len, num_samples = 32, 10_000_000
    indices = build_megatron_indices(lengths, np.arange(len(lengths)), seq_len, 1234, num_samples)
    total = len(indices.shuffle_index)
    assert total == (indices.num_epochs * int(lengths.sum()) - 1) // seq_len >= num_samples
    # every document once per epoch; every sample once; sample j starts on stream token j * seq_len
    assert (np.bincount(indices.document_index, minlength=len(lengths)) == indices.num_epochs).all()
    assert (np.bincount(indices.shuffle_index, minlength=total) == 1).all()
    starts = np.concatenate(([0], np.cumsum(lengths[indices.document_index])))
    stream_position = starts[indices.sample_index[:, 0]] + indices.sample_index[:, 1]
    assert (stream_position == np.arange(total + 1) * seq_len).all()


@pytest.mark.parametrize("kwargs, needle", [
    ({"seq_len": 0}, "seq_len"), ({"num_samples": -1}, "num_samples"), ({"split": "validation"}, "split"),
    ({"documents": [0, 5]}, "documents"), ({"documents": []}, "documents"), ({"documents": [1, 1]}, "no tokens"),
])
def test_bad_arguments_are_one_line_value_errors(tmp_path, kwargs, needle):
    write_indexed_dataset(str(tmp_path / "d"), [[1, 2, 3], [], [4, 5]], np.uint16)
    args = {"seq_len": 2, "seed": 0, "num_samples": 3, **kwargs}
    with pytest.raises(ValueError, match=needle) as error:
        MegatronGPTDataset(IndexedDataset(str(tmp_path / "d")), **args)
    assert "\n" not in str(error.value)
