"""Blends and splits of Megatron-LM corpora (``data.path``, ``data.split``), against megatron-core itself.

The references: megatron-core's split parsing and book-ends, its C++ blending index
(``helpers_cpp.build_blending_indices``) and its per-corpus sample counts; the counting
property of the draws is checked directly on counts.
"""
import math
import warnings

import numpy as np
import pytest

from megatron_ufp4.data.blend import (BlendError, Corpus, blend_index, corpus_sizes, parse_blend, parse_split,
                                      split_documents, split_sources)

with warnings.catch_warnings():  # megatron-core warns that Transformer Engine / Apex are missing
    warnings.simplefilter("ignore")
    mc_config = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_config")
    mc_builder = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
    mc_helpers = pytest.importorskip("megatron.core.datasets.helpers_cpp")


def test_blend_forms_and_normalized_weights():
    assert parse_blend("data/web") == [Corpus("data/web", None)]
    assert parse_blend(["data/web"]) == [Corpus("data/web", None)]
    assert parse_blend("3 data/web") == [Corpus("data/web", 1.0)]  # weighted: Megatron-LM blends it (surplus)
    assert parse_blend("30 data/a 70 data/b") == [Corpus("data/a", 0.3), Corpus("data/b", 0.7)]
    assert parse_blend([1, "a", 3, "b"]) == [Corpus("a", 0.25), Corpus("b", 0.75)]
    assert parse_blend(["a", "b", "c"]) == [Corpus("a", None), Corpus("b", None), Corpus("c", None)]


@pytest.mark.parametrize("value, needle", [
    ("", "empty"), ([], "empty"), ("0.5 a b 0.5", "mixes weights"), ("0 a 1 b", "> 0"), ("-1 a 2 b", "> 0"),
    ("nan a 1 b", "finite"), ("0.5 a 0.5 a", "appears twice"), ("a b a", "appears twice"),
])
def test_malformed_blend_is_one_line_naming_the_field(value, needle):
    with pytest.raises(BlendError, match=needle) as e:
        parse_blend(value, "data.valid_path")
    assert str(e.value).startswith("data.valid_path:") and "\n" not in str(e.value)


@pytest.mark.parametrize("split", ["969,30,1", "98,2,0", "1", "80,20", "0.6, 0.3, 0.1", "1,1,1", "949/50/1"])
def test_split_ratios_and_document_ranges_equal_megatron(split):
    ours = parse_split(split)
    ref = mc_config.parse_and_normalize_split(split)
    assert ours == ref
    matrix = mc_config.convert_split_vector_to_split_matrix(ref)
    for n in (1, 7, 100, 1001, 123457):
        got = split_documents(ours, n)
        for name, bookend in zip(("train", "valid", "test"), matrix):
            want = (np.array([], dtype=np.int64) if bookend is None
                    else np.arange(int(round(bookend[0] * n)), int(round(bookend[1] * n))))
            np.testing.assert_array_equal(got[name], want, err_msg=f"{split} {n} {name}")


@pytest.mark.parametrize("split", ["", "a,b", "1,2,3,4", "0,0,0", "-1,2"])
def test_malformed_split_is_one_line(split):
    with pytest.raises(BlendError, match="data.split"):
        parse_split(split)


def test_sources_split_one_path_or_name_separate_sets():
    s = split_sources("0.5 a 0.5 b", "98,2,0")
    assert set(s) == {"train", "valid"} and s["valid"].ratios == (0.98, 0.02, 0.0)
    s = split_sources("a", "969,30,1", valid_path="2 v 2 w")
    assert set(s) == {"train", "valid"} and s["train"].ratios is None
    assert s["valid"].corpora == (Corpus("v", 0.5), Corpus("w", 0.5))


@pytest.mark.parametrize("weights, size", [
    ([0.3, 0.7], 1000), ([0.5, 0.5], 999), ([0.2, 0.3, 0.5], 4096), ([1 / 3, 1 / 3, 1 / 3], 3000),
    ([0.01, 0.99], 2500), ([0.1] * 10, 777),
])
def test_blend_index_equals_megatrons_and_keeps_every_prefix_in_proportion(weights, size):
    corpus, within = blend_index(weights, size)
    ref_corpus = np.zeros(size, dtype=np.int16)
    ref_within = np.zeros(size, dtype=np.int64)
    mc_helpers.build_blending_indices(ref_corpus, ref_within, np.asarray(weights, dtype=np.float64),
                                      len(weights), size, False)
    np.testing.assert_array_equal(corpus, ref_corpus)
    np.testing.assert_array_equal(within, ref_within)
    # counts: after any n samples corpus c has had weight_c * n of them to within one sample, and
    # its samples are handed out in order 0, 1, 2, ...
    onehot = np.zeros((size, len(weights)), dtype=np.int64)
    onehot[np.arange(size), corpus] = 1
    counts = np.cumsum(onehot, axis=0)
    n = np.arange(1, size + 1)[:, None]
    assert np.abs(counts - n * np.asarray(weights)).max() <= 1.0 + 1e-9
    for c in range(len(weights)):
        np.testing.assert_array_equal(within[corpus == c], np.arange(int((corpus == c).sum())))


@pytest.mark.parametrize("weights, size", [([0.3, 0.7], 1000), ([0.2, 0.3, 0.5], 12345), ([0.999, 0.001], 10)])
def test_corpus_sizes_equal_megatrons(weights, size):
    drawn, built = corpus_sizes(weights, size)
    assert drawn == [per[0] for per in mc_builder._get_size_per_split_per_dataset(weights, [size])]
    assert built == [per[0] for per in mc_builder._get_size_per_split_per_dataset(weights, [size], surplus=0.005)]
    assert sum(drawn) >= size and all(b >= math.ceil(d) for b, d in zip(built, drawn))


class _StubTokenizer:
    """What megatron-core's GPTDataset reads of a tokenizer: eod and pad ids."""
    eod, pad, vocab_size = 0, -1, None
    unique_identifiers = {"class": "StubTokenizer"}


@pytest.mark.parametrize("path, split, sizes", [
    ("0.7 {a} 0.3 {b}", "90,10,0", (1000, 120, 0)),
    ("1 {a} 1 {b} 2 {c}", "80,15,5", (700, 50, 10)),
    ("{b}", "80,20,0", (300, 40, 0)),
    ("1 {b}", "80,20,0", (300, 40, 0)),  # one weighted corpus: blended, with the surplus
    ("{a} {b}", "90,10,0", (None, 40, 0)),  # unweighted: one pass each; train asks for all of it
])
def test_blend_samples_equal_megatron_core_token_for_token(tmp_path, monkeypatch, path, split, sizes):
    """Our train and valid samples of a blend equal the ones megatron-core's
    BlendedMegatronDatasetBuilder + GPTDataset build from the same files, seed and split."""
    import torch

    from megatron_ufp4.data.blend import build_split
    from megatron_ufp4.data.indexed_dataset import IndexedDataset, write_indexed_dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt = pytest.importorskip("megatron.core.datasets.gpt_dataset")
    rng = np.random.default_rng(3)
    prefixes = {}
    for name, docs in (("a", 300), ("b", 120), ("c", 40)):
        prefixes[name] = str(tmp_path / f"{name}_text_document")
        write_indexed_dataset(prefixes[name], [rng.integers(1, 30000, rng.integers(0, 60)) for _ in range(docs)],
                              np.uint16)
    path = path.format(**prefixes)
    seq_len, seed = 16, 1234
    blend = parse_blend(path)
    sources = split_sources(path, split)
    if sizes[0] is None:  # every sample one pass over each corpus's train split holds (the most it may draw)
        lengths = [np.asarray(IndexedDataset(c.prefix).doc_lengths, dtype=np.int64) for c in blend]
        ranges = [split_documents(list(sources["train"].ratios), len(n))["train"] for n in lengths]
        sizes = ((sum((int(n[r].sum()) - 1) // seq_len for n, r in zip(lengths, ranges))), *sizes[1:])
        with pytest.raises(BlendError, match="one pass over the unweighted corpora holds"):
            build_split(sources["train"], seq_len, seed, sizes[0] + 1)
    config = gpt.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, split=split, tokenizer=_StubTokenizer(),
        blend=([c.prefix for c in blend], None if blend[0].weight is None else [c.weight for c in blend]),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "c"))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)  # its blend asks, even in one process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = mc_builder.BlendedMegatronDatasetBuilder(gpt.GPTDataset, list(sizes), lambda: True,
                                                          config).build()
    for name, size, ref in zip(("train", "valid"), sizes, theirs):
        ours = build_split(sources[name], seq_len, seed, size)
        assert len(ours) >= size
        for i in range(size):
            want, got = ref[i], ours[i]
            assert torch.equal(got["tokens"], torch.as_tensor(want["tokens"]).long()), (name, i)
            assert torch.equal(got["labels"], torch.as_tensor(want["labels"]).long()), (name, i)
