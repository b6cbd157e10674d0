"""prepare with any tokenizer and at scale: Hugging Face tokenizer.json (trained here with the
``tokenizers`` library, nothing downloaded), JSON lines and gzip, several keys, worker processes,
bad records, the per-record split rule, the tokenizer stored with the dataset.

Expected token ids come from the ``tokenizers`` library's own encoding of each text; the split from
the rule computed in this file; datasets are read back with ``IndexedDataset``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ufp4.data import prepare
from megatron_ufp4.data.indexed_dataset import IndexedDataset
from megatron_ufp4.data.prepare_inputs import DataError, sample_training_lines
from megatron_ufp4.data.tokenizer import HFTokenizer, dataset_tokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the king queen lord lady sword crown night day love death honour fool wise speak thou thee art hath "
         "doth shall will not and but or yet if so café naïve").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(WORDS, size=rng.integers(2, 10))]
        out.append(" ".join(words).capitalize() + str(rng.choice([".", "!", "?"])))
    return out


def train_hf(path: Path, specials: list[str]) -> Path:
    """A byte-level BPE tokenizer.json trained on a few hundred short lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(300, seed=1), trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> Path:
    """EOS found by name: "</s>" is the only common end-of-text token it has."""
    return train_hf(tmp_path_factory.mktemp("hf") / "tokenizer.json", ["<unk>", "</s>"])


@pytest.fixture(scope="module")
def hf_json_no_eos(tmp_path_factory) -> Path:
    return train_hf(tmp_path_factory.mktemp("hf_custom") / "custom.json", ["<unk>", "<|doc_end|>"])


def in_val(seed: int, i: int, fraction: float) -> bool:
    """The split rule prepare documents, computed independently: BLAKE2b-64 of "<seed>:<i>" as a
    fraction of 2**64, below the val fraction."""
    draw = hashlib.blake2b(f"{seed}:{i}".encode("ascii"), digest_size=8).digest()
    return sum(b << (8 * (7 - k)) for k, b in enumerate(draw)) < fraction * 2 ** 64


def run(*argv) -> dict[str, dict]:
    return prepare.prepare_datasets(prepare.parse_args([str(a) for a in argv]))


def cli(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_ufp4.data.prepare", *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def docs(prefix) -> dict[str, list[list[int]]]:
    return {split: [d.tolist() for d in IndexedDataset(f"{prefix}_{split}")] for split in ("train", "val")}


def write_jsonl(path: Path, records: list) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(lines, mtime=0) if path.name.endswith(".gz") else lines)
    return path


def expected_split(texts: list[str], encode, eos: int, seed: int, fraction: float) -> dict[str, list[list[int]]]:
    out = {"train": [], "val": []}
    for i, text in enumerate(texts):
        out["val" if in_val(seed, i, fraction) else "train"].append(encode(text) + [eos])
    return out


# ----------------------------------------------------------------------------- Hugging Face tokenizers

def test_hf_ids_are_the_library_encoding_plus_eos(hf_json, tmp_path):
    lib = tokenizers.Tokenizer.from_file(str(hf_json))
    eos = lib.token_to_id("</s>")
    texts = sentences(60, seed=2) + ["  leading spaces and ☃ unseen\nnew line", "</s> is text here"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    stats = run("--input", src, "--output", tmp_path / "d", "--tokenizer", hf_json, "--val-fraction", 0.25,
                "--seed", 5, "--make-vocab-size-divisible-by", 64)["text"]
    expected = expected_split(texts, lambda t: lib.encode(t, add_special_tokens=False).ids, eos, 5, 0.25)
    assert docs(tmp_path / "d") == expected
    assert expected["val"] and expected["train"]
    vocab = max(lib.get_vocab(with_added_tokens=True).values()) + 1
    assert stats["vocab_size"] == vocab and stats["padded_vocab_size"] == math.ceil(vocab / 64) * 64
    assert stats["eos_id"] == eos and stats["tokenizer"]["kind"] == "huggingface"
    assert Path(f"{tmp_path / 'd'}.tokenizer.json").read_bytes() == hf_json.read_bytes()
    assert not Path(f"{tmp_path / 'd'}.model").exists()


def test_tokenizer_directory_names_its_eos(hf_json_no_eos, tmp_path):
    d = tmp_path / "tokdir"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(hf_json_no_eos.read_bytes())
    lib = tokenizers.Tokenizer.from_file(str(hf_json_no_eos))
    # special_tokens_map.json in the AddedToken form; tokenizer_config.json, when it names one, wins.
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<unk>", "lstrip": False}}))
    assert load_tokenizer(d).eos_id == lib.token_to_id("<unk>")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|doc_end|>", "bos_token": None}))
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == lib.token_to_id("<|doc_end|>")
    assert load_tokenizer(d, eos_token="<unk>").eos_id == lib.token_to_id("<unk>")  # --eos-token first

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in sentences(20, seed=3)])
    run("--input", src, "--output", tmp_path / "o", "--tokenizer", d, "--val-fraction", 0.2)
    stored = dataset_tokenizer(str(tmp_path / "o"))
    assert stored.eos_id == lib.token_to_id("<|doc_end|>")
    assert all(doc[-1] == stored.eos_id for split in docs(tmp_path / "o").values() for doc in split)


def test_missing_eos_is_one_line(hf_json_no_eos, tmp_path):
    with pytest.raises(ValueError) as info:
        load_tokenizer(hf_json_no_eos)
    assert "\n" not in str(info.value) and "--eos-token" in str(info.value) and str(hf_json_no_eos) in str(info.value)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the king"}])
    proc = cli("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json_no_eos, cwd=tmp_path)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and "--eos-token" in err[0], err
    with pytest.raises(DataError, match="'<nope>' is not in its vocabulary"):
        run("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json_no_eos, "--eos-token", "<nope>")
    assert not list(tmp_path.glob("o*"))


# ----------------------------------------------------------------------------- JSON lines, gzip, workers

def test_two_keys_gzip_and_workers_give_identical_bytes(hf_json, tmp_path):
    lib = tokenizers.Tokenizer.from_file(str(hf_json))
    eos = lib.token_to_id("</s>")
    records = [{"text": t, "title": t.split()[0] + f" {i}"} for i, t in enumerate(sentences(120, seed=4))]
    write_jsonl(tmp_path / "a.jsonl", records[:70])
    write_jsonl(tmp_path / "b.jsonl.gz", records[70:])
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        proc = cli("--input", tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", "--output", out / "ds", "--tokenizer",
                   hf_json, "--json-keys", "text", "title", "--val-fraction", 0.2, "--workers", workers, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        outputs[workers] = out
    names = sorted(p.name for p in outputs[1].iterdir())
    assert names == sorted(f"ds_{key}{suffix}" for key in ("text", "title") for suffix in
                           ("_train.bin", "_train.idx", "_val.bin", "_val.idx", ".json", ".tokenizer.json"))
    assert names == sorted(p.name for p in outputs[2].iterdir())
    for name in names:
        one, two = (outputs[w] / name for w in (1, 2))
        if name.endswith(".json") and not name.endswith(".tokenizer.json"):
            a, b = (json.loads(f.read_text().replace(str(f.parent), "OUT")) for f in (one, two))  # paths name the dir
            assert {**a, "elapsed_s": 0} == {**b, "elapsed_s": 0}, name
        else:
            assert one.read_bytes() == two.read_bytes(), name
    for key in ("text", "title"):  # both keys' datasets split record by record the same way
        expected = expected_split([r[key] for r in records], lambda t: lib.encode(t, add_special_tokens=False).ids,
                                  eos, 0, 0.2)
        assert docs(outputs[1] / f"ds_{key}") == expected
        assert json.loads((outputs[1] / f"ds_{key}.json").read_text())["json_key"] == key


# ----------------------------------------------------------------------------- bad records

GOOD = {"text": "the king speaks"}


@pytest.mark.parametrize("bad, reason", [
    ('{"text": "unterminated', "invalid JSON"),
    ({"title": "no text key"}, "no key 'text'"),
    ({"text": ["a", "list"]}, "holds a list, not a string"),
    ("[1, 2]", "not a JSON object"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8 at byte offset"),
], ids=["invalid-json", "missing-key", "not-a-string", "not-an-object", "not-utf8"])
def test_bad_record_names_file_and_line(hf_json, tmp_path, bad, reason):
    src = tmp_path / "in.jsonl.gz"
    lines = [json.dumps(GOOD).encode(), b"", json.dumps(GOOD).encode(),
             bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode(),
             json.dumps({"text": "after the bad one"}).encode()]
    src.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(DataError) as info:  # --errors stop (the default): the line, nothing written
        run("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json)
    msg = str(info.value)
    assert msg.startswith(f"{src}:4: ") and reason in msg and "\n" not in msg, msg
    assert sorted(tmp_path.iterdir()) == before

    stats = run("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json, "--errors", "skip",
                "--val-fraction", 0)["text"]
    assert stats["bad_records_skipped"] == 1
    lib = tokenizers.Tokenizer.from_file(str(hf_json))
    texts = [GOOD["text"], GOOD["text"], "after the bad one"]
    assert docs(tmp_path / "o")["train"] == [lib.encode(t, add_special_tokens=False).ids + [stats["eos_id"]]
                                             for t in texts]


def test_bad_records_cli_skip_warns_and_stop_writes_nothing(hf_json, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "one"}\n{"text": 1}\nnot json\n{"text": "two"}\n')
    proc = cli("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json, "--errors", "strict", cwd=tmp_path)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and err == [f"error: {src}:2: key 'text' holds a int, not a string; pass --errors "
                                            "skip to drop such records"], err
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".*"))
    proc = cli("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json, "--errors", "skip", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert [w.split(": ")[1] for w in warnings[:2]] == [f"{src}:2", f"{src}:3"]
    assert json.loads((tmp_path / "o.json").read_text())["bad_records_skipped"] == 2


def test_undecodable_paragraph_is_skipped_by_line(hf_json, tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes(b"First paragraph.\n\nSecond \xff line\ncontinues.\n\nThird one.\n")
    with pytest.raises(DataError, match=rf"^{src}:3: invalid UTF-8 at byte offset 25 \(byte 0xff\)"):
        run("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json, "--split-paragraphs")
    stats = run("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json, "--split-paragraphs",
                "--errors", "skip", "--val-fraction", 0)["text"]
    tok = dataset_tokenizer(str(tmp_path / "o"))
    assert [tok.decode(d[:-1]) for d in docs(tmp_path / "o")["train"]] == ["First paragraph.", "Third one."]
    assert stats["bad_records_skipped"] == 1


def test_replace_substitutes_u_fffd_in_json_lines(hf_json, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "caf\xe9 au lait"}\n{"text": "lone \\udc80 surrogate"}\n')
    run("--input", src, "--output", tmp_path / "o", "--tokenizer", hf_json, "--errors", "replace", "--val-fraction", 0)
    tok = dataset_tokenizer(str(tmp_path / "o"))
    lib = tokenizers.Tokenizer.from_file(str(hf_json))
    expected = ["caf\ufffd au lait", "lone \ufffd surrogate"]
    assert docs(tmp_path / "o")["train"] == [lib.encode(t, add_special_tokens=False).ids + [tok.eos_id]
                                             for t in expected]


# ----------------------------------------------------------------------------- the stored tokenizer

def test_dataset_tokenizer_round_trip_both_kinds(hf_json, tmp_path):
    texts = sentences(30, seed=6) + ["Ωmega ☃ and\ttabs  "]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    sp = run("--input", src, "--output", tmp_path / "sp", "--vocab-size", 320, "--val-fraction", 0.3,
             "--make-vocab-size-divisible-by", 1)["text"]
    hf = run("--input", src, "--output", tmp_path / "hf", "--tokenizer", hf_json, "--val-fraction", 0.3)["text"]
    for prefix, stats, kind in ((tmp_path / "sp", sp, "sentencepiece"), (tmp_path / "hf", hf, "huggingface")):
        tok = dataset_tokenizer(str(prefix))
        assert tok.kind == kind and tok.eos_id == stats["eos_id"] and tok.vocab_size == stats["vocab_size"]
        split = docs(prefix)
        expected = {"train": [t for i, t in enumerate(texts) if not in_val(0, i, 0.3)],
                    "val": [t for i, t in enumerate(texts) if in_val(0, i, 0.3)]}
        assert {s: [tok.decode(d[:-1]) for d in split[s]] for s in split} == expected
    assert sp["padded_vocab_size"] == sp["vocab_size"]  # N=1: no padding
    assert Path(f"{tmp_path / 'sp'}.model").is_file() and Path(f"{tmp_path / 'sp'}.vocab").is_file()

    # A dataset prepared before <prefix>.json named its tokenizer: <prefix>.model.
    meta = Path(f"{tmp_path / 'sp'}.json")
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "tokenizer"}))
    assert dataset_tokenizer(str(tmp_path / "sp")).kind == "sentencepiece"

    # --overwrite with the other kind leaves no stale tokenizer file behind.
    run("--input", src, "--output", tmp_path / "sp", "--tokenizer", hf_json, "--overwrite")
    assert dataset_tokenizer(str(tmp_path / "sp")).kind == "huggingface"
    assert not Path(f"{tmp_path / 'sp'}.model").exists() and not Path(f"{tmp_path / 'sp'}.vocab").exists()

    with pytest.raises(FileNotFoundError, match=f"dataset {tmp_path / 'none'}: no tokenizer stored"):
        dataset_tokenizer(str(tmp_path / "none"))


def test_reservoir_sample_is_bounded_and_training_only():
    records = [(i, [f"line {i} a\nline {i} b\n\n"]) for i in range(200)]
    train_lines = [f"line {i} {s}" for i in range(200) if not in_val(3, i, 0.25) for s in "ab"]
    everything, n = sample_training_lines(records, 3, 0.25, max_lines=10_000)
    assert everything == train_lines and n == 200
    sample, _ = sample_training_lines(records, 3, 0.25, max_lines=20)
    assert len(sample) == 20 and len(set(sample)) == 20 and set(sample) <= set(train_lines)
    assert sample == sample_training_lines(records, 3, 0.25, max_lines=20)[0]  # seeded
