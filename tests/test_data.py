"""Data pipeline: tokenizer, packing, sample order, sampler, prepare CLI (the .bin/.idx files: test_indexed_dataset.py).

Expected values come from independent references (the generated text, numpy
concatenation, struct-parsed headers, numpy's PCG64 permutation), not from the code under test.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ufp4.data.gpt_dataset import GlobalBatchSampler, GPTDataset
from megatron_ufp4.data.indexed_dataset import (IndexedDataset, write_indexed_dataset)
from megatron_ufp4.data.tokenizer import Tokenizer, train_sentencepiece

WORDS = ("the king queen lord lady sword crown night day love death honour fool wise speak "
         "thou thee art hath doth shall will not and but or yet if so").split()
VOCAB = 320  # byte fallback needs 259 ids + the corpus characters, so ~200 is too few


def make_paragraph(rng) -> str:
    lines = []
    for _ in range(rng.integers(1, 4)):
        words = [str(w) for w in rng.choice(WORDS, size=rng.integers(3, 12))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + str(rng.choice([".", ",", "!", "?", ";"])))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five text files of blank-line separated paragraphs; returns (dir, paragraphs)."""
    rng = np.random.default_rng(1234)
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    paragraphs = []
    for f in range(5):
        paras = [make_paragraph(rng) for _ in range(12)]
        paras[0] += " Café — naïve 日本"  # some non-ASCII
        paragraphs += paras
        path = root / ("sub" if f % 2 else ".") / f"part{f}.txt"
        path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    (root / "ignored.md").write_text("not matched by the default --glob\n", encoding="utf-8")
    return root, paragraphs


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    _, paragraphs = corpus
    lines = [line for p in paragraphs for line in p.split("\n")]
    model = tmp_path_factory.mktemp("tok") / "tiny.model"
    return train_sentencepiece(lines, str(model), VOCAB)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip(corpus, tokenizer):
    _, paragraphs = corpus
    odd = ["  two leading spaces,\ttab and  double  space  ", "\n\nnewlines\n", "",
           "unseen: Ωmega ☃ 😀 \x01"]
    for text in paragraphs + odd:
        ids = tokenizer.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tokenizer.unk_id not in ids  # byte fallback: nothing maps to <unk>
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(np.asarray(ids)) == text
        assert tokenizer.decode(torch.tensor(ids)) == text
    assert 259 < tokenizer.vocab_size <= VOCAB
    assert len({tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id}) == 3
    assert tokenizer.encode("king", add_eos=True)[-1] == tokenizer.eos_id


def test_tokenizer_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(str(tmp_path / "nope.model"))


def test_tokenizer_training_is_reproducible(corpus, tokenizer, tmp_path):
    _, paragraphs = corpus
    lines = [line for p in paragraphs for line in p.split("\n")]
    again = train_sentencepiece(lines, str(tmp_path / "again.model"), VOCAB)
    assert Path(again.model_path).read_bytes() == Path(tokenizer.model_path).read_bytes()


# ----------------------------------------------------------------------------- packing helpers

def random_docs(rng, n, high, max_len=40):
    return [rng.integers(0, high, size=rng.integers(0, max_len)) for _ in range(n)]



# ----------------------------------------------------------------------------- packing

@pytest.fixture(scope="module")
def packed_docs(tmp_path_factory):
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 60, 5000, max_len=50)
    docs[3] = np.array([], dtype=np.int64)  # empty documents must not break the index
    prefix = str(tmp_path_factory.mktemp("packed") / "ds")
    write_indexed_dataset(prefix, docs, np.uint16)
    return IndexedDataset(prefix), docs


def test_packing_reconstructs_stream(packed_docs):
    ds, docs = packed_docs
    seq_len = 16
    stream = np.concatenate(docs)
    gpt = GPTDataset(ds, seq_len, shuffle=False)
    assert len(gpt) == (len(stream) - 1) // seq_len
    for j in range(len(gpt)):
        s = gpt[j]
        assert s["tokens"].dtype == torch.int64 and s["labels"].dtype == torch.int64
        assert s["tokens"].shape == (seq_len,) and s["labels"].shape == (seq_len,)
        np.testing.assert_array_equal(s["tokens"].numpy(), stream[j * seq_len:(j + 1) * seq_len])
        np.testing.assert_array_equal(s["labels"].numpy(), stream[j * seq_len + 1:(j + 1) * seq_len + 1])
    rebuilt = np.concatenate([gpt[j]["tokens"].numpy() for j in range(len(gpt))])
    np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])


def test_packing_document_subset(packed_docs):
    ds, docs = packed_docs
    order = [10, 2, 3, 40, 7, 7, 59, 0]
    stream = np.concatenate([docs[d] for d in order])
    gpt = GPTDataset(ds, 8, documents=order, shuffle=False)
    rebuilt = np.concatenate([gpt[j]["tokens"].numpy() for j in range(len(gpt))]
                             + [gpt[len(gpt) - 1]["labels"].numpy()[-1:]])
    np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])
    assert len(gpt) == (len(stream) - 1) // 8


def test_shuffled_order_matches_pcg64_permutation(packed_docs):
    ds, docs = packed_docs
    seq_len, seed = 12, 5
    stream = np.concatenate(docs)
    per_epoch = (len(stream) - 1) // seq_len
    gpt = GPTDataset(ds, seq_len, seed=seed, num_samples=2 * per_epoch + 7)
    assert len(gpt) == 2 * per_epoch + 7 and gpt.num_epochs == 3
    for i in range(len(gpt)):
        epoch, k = divmod(i, per_epoch)
        j = np.random.Generator(np.random.PCG64(seed + epoch)).permutation(per_epoch)[k]
        np.testing.assert_array_equal(gpt[i]["tokens"].numpy(), stream[j * seq_len:(j + 1) * seq_len])
        np.testing.assert_array_equal(gpt[i]["labels"].numpy(), stream[j * seq_len + 1:(j + 1) * seq_len + 1])


def test_order_determinism(packed_docs):
    ds, _ = packed_docs

    def sample_order(seed):
        gpt = GPTDataset(ds, 10, seed=seed, num_epochs=2)
        return np.stack([gpt[i]["tokens"].numpy() for i in range(len(gpt))])

    a, b, c = sample_order(3), sample_order(3), sample_order(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Same samples, different order: the multiset of windows does not depend on the seed.
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, c.tolist()))


def test_dataset_too_small(packed_docs):
    ds, docs = packed_docs
    with pytest.raises(ValueError, match="cannot fill one sample"):
        GPTDataset(ds, sum(len(d) for d in docs))


# ----------------------------------------------------------------------------- sampler

def flat(batches):
    return [i for batch in batches for i in batch]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume_gives_tail(drop_last):
    total, gbs = 103, 8
    full = flat(GlobalBatchSampler(total, gbs, drop_last=drop_last))
    assert full == list(range(total if not drop_last else total // gbs * gbs))
    resume_points = range(0, total + 1, gbs) if drop_last else range(total + 1)
    for k in resume_points:
        assert flat(GlobalBatchSampler(total, gbs, consumed_samples=k, drop_last=drop_last)) == full[k:]


def test_sampler_state_dict_round_trip():
    total, gbs = 100, 10
    sampler = GlobalBatchSampler(total, gbs)
    it = iter(sampler)
    seen = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    assert state == {"consumed_samples": 30}
    resumed = GlobalBatchSampler(total, gbs)
    resumed.load_state_dict(state)
    assert len(resumed) == 7
    assert flat(seen) + flat(resumed) == list(range(total))


@pytest.mark.parametrize("sharding", ["contiguous", "interleaved"])
def test_sampler_dp_sharding(sharding):
    total, gbs, dp = 64, 8, 4
    for consumed in (0, 16, 5):  # also mid-batch resume
        ranks = [list(GlobalBatchSampler(total, gbs, dp_rank=r, dp_size=dp, consumed_samples=consumed,
                                         sharding=sharding)) for r in range(dp)]
        num_batches = (total - consumed) // gbs
        assert all(len(batches) == num_batches for batches in ranks)
        for b in range(num_batches):
            start = consumed + b * gbs
            shares = [ranks[r][b] for r in range(dp)]
            assert all(len(s) == gbs // dp for s in shares)
            assert sorted(flat(shares)) == list(range(start, start + gbs))  # disjoint + covering
            for r, share in enumerate(shares):
                expected = (list(range(start + r * 2, start + r * 2 + 2)) if sharding == "contiguous"
                            else list(range(start + r, start + gbs, dp)))
                assert share == expected


def test_sampler_with_dataloader(packed_docs):
    ds, _ = packed_docs
    gpt = GPTDataset(ds, 8, seed=1)
    sampler = GlobalBatchSampler(len(gpt), 8, dp_rank=1, dp_size=2, consumed_samples=16)
    loader = torch.utils.data.DataLoader(gpt, batch_sampler=sampler)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (4, 8) and batch["labels"].shape == (4, 8)
    np.testing.assert_array_equal(batch["tokens"][0].numpy(), gpt[20]["tokens"].numpy())


# ----------------------------------------------------------------------------- prepare CLI

def hash_rule_in_val(seed: int, i: int, fraction: float) -> bool:
    """prepare's documented split rule, computed here: record i is in val when the first 8 bytes of
    BLAKE2b("<seed>:<i>"), read as a big-endian fraction of 2**64, fall below the val fraction."""
    draw = hashlib.blake2b(f"{seed}:{i}".encode("ascii"), digest_size=8).digest()
    return sum(b << (8 * (7 - k)) for k, b in enumerate(draw)) < fraction * 2 ** 64


def run_prepare(*args, cwd):
    return subprocess.run([sys.executable, "-m", "megatron_ufp4.data.prepare", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_prepare_end_to_end(corpus, tokenizer, tmp_path):
    root, paragraphs = corpus
    out = tmp_path / "out" / "demo"
    proc = run_prepare("--input", root, "--output", out, "--vocab-size", VOCAB,
                       "--split-paragraphs", "--val-fraction", "0.2", "--seed", 3, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "out" / "demo.json").read_text())
    tok = Tokenizer(str(out) + ".model")
    decoded = []
    for split in ("train", "val"):
        ds = IndexedDataset(f"{out}_{split}")
        assert ds.dtype == np.uint16
        assert (len(ds), ds.num_tokens) == (stats[split]["docs"], stats[split]["tokens"])
        for doc in ds:
            assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
            decoded.append(tok.decode(doc[:-1]))
    # Input order: files sorted by path (part0, part2, part4, sub/part1, sub/part3), paragraphs in file order;
    # each split keeps that order, and paragraph i is in val exactly when the stated hash rule says so.
    files = sorted(range(5), key=lambda f: str(root / ("sub" if f % 2 else ".") / f"part{f}.txt"))
    in_order = [p for f in files for p in paragraphs[12 * f:12 * (f + 1)]]
    expected_val = [p for i, p in enumerate(in_order) if hash_rule_in_val(3, i, 0.2)]
    expected_train = [p for i, p in enumerate(in_order) if not hash_rule_in_val(3, i, 0.2)]
    assert 0 < len(expected_val) < len(paragraphs)
    assert decoded == expected_train + expected_val  # every paragraph exactly once, exact text, in order
    assert stats["vocab_size"] == tok.vocab_size and stats["files_used"] == 5

    # Same seed -> byte-identical outputs; reusing the tokenizer gives the same tokens.
    again = tmp_path / "again"
    proc = run_prepare("--input", root, "--output", again, "--tokenizer-model", str(out) + ".model",
                       "--split-paragraphs", "--val-fraction", "0.2", "--seed", 3, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for suffix in ("_train.bin", "_train.idx", "_val.bin", "_val.idx", ".model"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{again}{suffix}").read_bytes()
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp." in p]


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.txt"
    path.write_text("The king hath spoken.\n\nAnd so shall it be.\n", encoding="utf-8")
    return path


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_missing_path(tmp_path):
    proc = run_prepare("--input", tmp_path / "nope", "--output", tmp_path / "o", "--vocab-size", VOCAB,
                       cwd=tmp_path)
    assert_one_line_error(proc, "nope", "does not exist")


def test_cli_no_text_files(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    proc = run_prepare("--input", tmp_path / "empty_dir", "--output", tmp_path / "o", "--vocab-size",
                       VOCAB, cwd=tmp_path)
    assert_one_line_error(proc, "no files matching")


@pytest.mark.parametrize("name, content, reason", [
    ("empty.txt", b"", "empty"),
    ("blank.txt", b"  \n\n\t\n", "empty"),
    ("nul.txt", b"MZ\x00\x01\x02 some text", "binary"),
    ("noise.txt", bytes(range(128, 256)) * 4, "binary"),
], ids=["empty", "whitespace-only", "nul-bytes", "undecodable"])
def test_cli_skipped_file_alone_is_an_error(tmp_path, good_file, name, content, reason):
    bad = tmp_path / name
    bad.write_bytes(content)
    proc = run_prepare("--input", bad, "--output", tmp_path / "o", "--vocab-size", VOCAB, cwd=tmp_path)
    assert_one_line_error(proc, name, reason)
    assert not list(tmp_path.glob("o*"))

    # Next to a good file it is only a warning, and the run succeeds.
    proc = run_prepare("--input", bad, good_file, "--output", tmp_path / "o", "--vocab-size", VOCAB,
                       "--split-paragraphs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(name in line and reason in line for line in stderr_lines(proc))
    stats = json.loads((tmp_path / "o.json").read_text())
    assert [s["path"] for s in stats["files_skipped"]] == [str(bad)]
    assert stats["train"]["docs"] + stats["val"]["docs"] == 2


def test_cli_invalid_utf8(tmp_path):
    bad = tmp_path / "latin.txt"
    prefix = "Thou art a villain.\n\n".encode()
    bad.write_bytes(prefix + b"caf\xe9 au lait\n\nAnd more text here.\n")
    offset = len(prefix) + 3
    proc = run_prepare("--input", bad, "--output", tmp_path / "o", "--vocab-size", VOCAB,
                       "--split-paragraphs", cwd=tmp_path)
    assert_one_line_error(proc, "latin.txt", f"byte offset {offset}", "--errors replace")
    assert not list(tmp_path.glob("o*"))

    proc = run_prepare("--input", bad, "--output", tmp_path / "o", "--vocab-size", VOCAB,
                       "--split-paragraphs", "--errors", "replace", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer(str(tmp_path / "o.model"))
    texts = [tok.decode(doc[:-1]) for split in ("train", "val") for doc in IndexedDataset(f"{tmp_path}/o_{split}")]
    assert "caf\ufffd au lait" in texts
