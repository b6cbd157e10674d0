"""Tokenizers a dataset can be prepared with: a sentencepiece model or a Hugging Face tokenizer.json.

Both kinds share one small interface (``BaseTokenizer``): ``vocab_size``, ``eos_id``, ``bos_id``,
``pad_id`` (-1 when there is none), ``encode``, ``encode_batch``, ``decode``, and ``path`` /
``files`` (what it was loaded from).  ``load_tokenizer(path)`` picks the kind from the path;
``dataset_tokenizer(prefix)`` opens the tokenizer stored beside a prepared dataset.  Nothing here
fetches anything from a network: a Hugging Face tokenizer is a local file.

End of text for a Hugging Face tokenizer (``resolve_eos``), first that applies:

1. the ``eos_token`` argument (prepare's ``--eos-token``);
2. ``eos_token`` in ``tokenizer_config.json``, else in ``special_tokens_map.json``, beside the
   tokenizer (a directory given, or a file named ``tokenizer.json``);
3. the one of ``END_OF_TEXT_TOKENS`` that the vocabulary holds, if exactly one does.  End-of-turn
   tokens of chat models (``<|im_end|>``, ``<|eot_id|>``) are deliberately not candidates: a
   pretraining document ends with the end-of-text token, and Qwen-style vocabularies hold both.

Hugging Face encoding never adds special tokens (``add_special_tokens=False``): a document's ids
are the tokenizer's plain encoding, and the end of document is appended by prepare.

Training recipe for sentencepiece (``train_sentencepiece``), Llama-style so that
decode(encode(text)) == text for any string:

* BPE with ``byte_fallback``: characters outside the vocabulary become <0xNN> byte
  pieces instead of <unk>, so every text encodes (a newline is the piece <0x0A>).
* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``: no NFKC and
  no whitespace collapsing, so the round trip is exact.
* ``add_dummy_prefix=False``: the trainer sees lines but we encode whole documents, where
  most words at a line start follow "\\n", not a space; a dummy "▁" would make line-initial
  words tokenize differently in training and in use.
* ``hard_vocab_limit=False``: a small corpus may not support the requested vocabulary;
  the model then simply comes out smaller (``vocab_size`` is the real size).

Special ids are sentencepiece's defaults: unk=0, bos=1, eos=2, no pad (-1).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from ..outputs import atomic_file

# Bytes (256) + unk/bos/eos: the smallest vocabulary byte_fallback allows, before any
# character of the corpus is added.
MIN_BYTE_FALLBACK_VOCAB = 259
# End-of-text tokens of common vocabularies (Llama-2/Mistral/T5, GPT-2/Qwen, Llama-3, Gemma).
END_OF_TEXT_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BEGIN_OF_TEXT_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")
PAD_TOKENS = ("<pad>", "<|pad|>")
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"
# Where prepare stores the tokenizer beside a dataset <prefix>, by kind.
DATASET_TOKENIZER_SUFFIX = {SENTENCEPIECE: ".model", HUGGINGFACE: ".tokenizer.json"}


class BaseTokenizer:
    """What prepare, eval and sample need of a tokenizer, whatever its kind."""

    kind: str
    path: str  # the tokenizer file itself
    files: tuple[str, ...]  # every file read to build it (the tokenizer, configs naming its EOS)

    @property
    def vocab_size(self) -> int:  # every id is below it
        raise NotImplementedError

    eos_id: int
    bos_id: int
    pad_id: int

    @property
    def eos_token(self) -> str:
        raise NotImplementedError

    def _encode_plain(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._with_specials(self._encode_plain([text], 1)[0], add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_eos: bool = False, num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts; ``num_threads=1`` encodes in the calling thread (prepare's workers),
        ``None`` lets the library use its own thread pool."""
        return [self._with_specials(ids, False, add_eos) for ids in self._encode_plain(list(texts), num_threads)]

    def decode(self, ids) -> str:
        """Accepts a list, numpy array or torch tensor of ids; special tokens decode to nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._decode_plain([int(i) for i in ids])

    def _with_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id < 0:
                raise ValueError(f"tokenizer {self.path} has no BOS token")
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if add_eos else ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(BaseTokenizer):
    """A sentencepiece ``.model``; its EOS is the model's own unless ``eos_token`` names a piece."""

    kind = SENTENCEPIECE

    def __init__(self, model_path: str | os.PathLike, eos_token: str | None = None):
        model_path = str(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
        self.model_path = self.path = model_path
        self.files = (model_path,)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load sentencepiece model {model_path}: {e}") from None
        self.eos_id = self._sp.eos_id()
        if eos_token is not None:
            self.eos_id = self._sp.PieceToId(eos_token)
            if self._sp.IdToPiece(self.eos_id) != eos_token:  # unknown pieces map to <unk>
                raise ValueError(f"eos token {eos_token!r} is not a piece of {model_path}")
        self.bos_id = self._sp.bos_id()
        self.pad_id = self._sp.pad_id()  # -1: the model has no pad token

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def eos_token(self) -> str:
        return self._sp.IdToPiece(self.eos_id) if self.eos_id >= 0 else ""

    def _encode_plain(self, texts, num_threads):
        return self._sp.Encode(texts, num_threads=num_threads or os.cpu_count() or 1)

    def _decode_plain(self, ids):
        return self._sp.Decode(ids)


# The name hf/convert.py and older code import.
Tokenizer = SentencePieceTokenizer


def _config_token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _config_eos(config_dir: Path | None) -> tuple[str | None, list[str]]:
    """(eos token named by the directory's config files, the config files read)."""
    if config_dir is None:
        return None, []
    read = []
    for name in HF_CONFIG_FILES:
        f = config_dir / name
        if not f.is_file():
            continue
        read.append(str(f))
        try:
            config = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {f}: {e}") from None
        token = _config_token(config.get("eos_token")) if isinstance(config, dict) else None
        if token:
            return token, read
    return None, read


def _unique_present(tokenizer, candidates) -> str | None:
    present = [t for t in candidates if tokenizer.token_to_id(t) is not None]
    return present[0] if len(present) == 1 else None


def resolve_eos(tokenizer, path: str, eos_token: str | None, config_dir: Path | None) -> tuple[str, list[str]]:
    """The end-of-text token of a Hugging Face tokenizer (rule: module docstring) and the config
    files read to find it; one-line ValueError when there is none or it is not in the vocabulary."""
    token, read = (eos_token, []) if eos_token else _config_eos(config_dir)
    source = "--eos-token" if eos_token else (f"eos_token in {read[-1]}" if token else None)
    if token is None:
        present = [t for t in END_OF_TEXT_TOKENS if tokenizer.token_to_id(t) is not None]
        if len(present) != 1:
            found = (f"several end-of-text tokens ({', '.join(present)})" if present
                     else f"no end-of-text token (none of {', '.join(END_OF_TEXT_TOKENS)})")
            raise ValueError(f"tokenizer {path}: {found} in its vocabulary and no tokenizer_config.json naming "
                             "eos_token; pass --eos-token TOKEN")
        token = present[0]
    if tokenizer.token_to_id(token) is None:
        raise ValueError(f"tokenizer {path}: {source} {token!r} is not in its vocabulary")
    return token, read


class HFTokenizer(BaseTokenizer):
    """A Hugging Face ``tokenizer.json`` (``tokenizers`` library); EOS resolved by ``resolve_eos``."""

    kind = HUGGINGFACE

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None, config_dir: str | Path | None = None):
        from tokenizers import Tokenizer as _Tokenizer  # only datasets with an HF tokenizer pay for it

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer not found: {self.path}")
        try:
            self._tok = _Tokenizer.from_file(self.path)
        except Exception as e:  # the library raises a bare Exception with the parser's reason
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot load Hugging Face tokenizer {self.path}: {reason}") from None
        self._eos_token, config_files = resolve_eos(self._tok, self.path, eos_token,
                                                     Path(config_dir) if config_dir is not None else None)
        self.files = (self.path, *config_files)
        self.eos_id = self._tok.token_to_id(self._eos_token)
        # Informational only (prepare adds no BOS, pads nothing): common names when unambiguous.
        bos, pad = _unique_present(self._tok, BEGIN_OF_TEXT_TOKENS), _unique_present(self._tok, PAD_TOKENS)
        self.bos_id = self._tok.token_to_id(bos) if bos else -1
        self.pad_id = self._tok.token_to_id(pad) if pad else -1
        # Max id + 1, not the entry count: added tokens may leave gaps, and ids must fit below it.
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token(self) -> str:
        return self._eos_token

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def _encode_plain(self, texts, num_threads):
        if num_threads == 1:  # encode_batch would use the library's thread pool
            return [self._tok.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode_plain(self, ids):
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike, eos_token: str | None = None) -> BaseTokenizer:
    """A sentencepiece ``.model``, a Hugging Face ``tokenizer.json`` (any ``*.json``), or a
    directory holding ``tokenizer.json`` (else a sentencepiece ``tokenizer.model``)."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p / "tokenizer.json", eos_token, config_dir=p)
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model", eos_token)
        raise ValueError(f"tokenizer directory {path} holds no tokenizer.json (nor a sentencepiece tokenizer.model)")
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p, eos_token)
    if p.suffix == ".json":
        return HFTokenizer(p, eos_token, config_dir=p.parent if p.name == "tokenizer.json" else None)
    raise ValueError(f"tokenizer {path}: not a sentencepiece .model, a Hugging Face tokenizer.json, "
                     "or a directory holding one")


def dataset_tokenizer(prefix: str) -> BaseTokenizer:
    """The tokenizer stored with the dataset prepared at ``prefix``: the one ``<prefix>.json``
    names, else (datasets prepared before it named one) ``<prefix>.model``."""
    meta_path = Path(f"{prefix}.json")
    info = None
    if meta_path.is_file():
        try:
            info = json.loads(meta_path.read_text(encoding="utf-8")).get("tokenizer")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"cannot read {meta_path}: {e}") from None
    if isinstance(info, dict) and info.get("kind") in DATASET_TOKENIZER_SUFFIX and info.get("file"):
        path = meta_path.parent / info["file"]
        if not path.is_file():
            raise FileNotFoundError(f"dataset {prefix}: its tokenizer {path} (named in {meta_path}) is missing")
        cls = SentencePieceTokenizer if info["kind"] == SENTENCEPIECE else HFTokenizer
        tokenizer = cls(path, eos_token=info.get("eos_token"))
        if "eos_id" in info and tokenizer.eos_id != info["eos_id"]:
            raise ValueError(f"dataset {prefix}: {path} has eos id {tokenizer.eos_id}, not the {info['eos_id']} "
                             f"recorded in {meta_path}")
        return tokenizer
    if Path(f"{prefix}.model").is_file():
        return SentencePieceTokenizer(f"{prefix}.model")
    raise FileNotFoundError(f"dataset {prefix}: no tokenizer stored with it ({meta_path} names none and there "
                            f"is no {prefix}.model)")


def configured_tokenizer(tokenizer: str | None, prefix: str | None) -> BaseTokenizer | None:
    """A run's tokenizer: ``tokenizer`` (its ``data.tokenizer``) when set, else the one stored with
    the dataset prepared at ``prefix`` (a ``data.prefix`` run); None for neither (``data.path``
    corpora carry none).  A ``tokenizer`` that is not the file stored with ``prefix``'s dataset
    is refused: the ids would be decoded as other pieces."""
    if not tokenizer:
        return dataset_tokenizer(prefix) if prefix is not None else None
    tok = load_tokenizer(tokenizer)
    if prefix is not None:
        try:
            stored = dataset_tokenizer(prefix)
        except FileNotFoundError:
            return tok
        if tokenizer_fingerprint(stored.path) != tokenizer_fingerprint(tok.path):
            raise ValueError(f"{tokenizer} is not the tokenizer the dataset {prefix} was prepared with "
                             f"({stored.path})")
    return tok


def tokenizer_record(tokenizer: BaseTokenizer, file_name: str) -> dict:
    """What ``<prefix>.json`` records so ``dataset_tokenizer`` can open the stored copy."""
    return {"kind": tokenizer.kind, "file": file_name, "eos_token": tokenizer.eos_token, "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id, "vocab_size": tokenizer.vocab_size}


def _write_atomic(path: str, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def tokenizer_fingerprint(model_path: str | None) -> str | None:
    """SHA-256 of a tokenizer file (None when there is none): ids mean the same pieces
    exactly when the fingerprints agree."""
    if model_path is None:
        return None
    try:
        with open(model_path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def train_sentencepiece(sentences: Iterable[str], model_path: str, vocab_size: int,
                        character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000, seed: int = 0) -> SentencePieceTokenizer:
    """Train a BPE model on ``sentences`` (lines of text) and write it to ``model_path``.

    Also writes the human-readable ``<name>.vocab`` (piece TAB score) beside it.  The model
    is trained in memory (``model_writer``) and written atomically; this also keeps temp
    file names out of the model, so the same corpus and seed give a byte-identical file.
    Raises ValueError with sentencepiece's reason when training fails (e.g. vocab_size
    too small for the corpus's characters).
    """
    if not model_path.endswith(".model"):
        raise ValueError(f"model path must end in .model: {model_path}")
    model_bytes = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the line sampling below is random
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sentences), model_writer=model_bytes,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
            hard_vocab_limit=False, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            # Large corpora: train on a random sample of lines, not all of them.
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        # sentencepiece errors look like "INTERNAL: src/x.cc(123) [cond] Reason."; keep the reason.
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        if "] " in reason:
            reason = reason.split("] ", 1)[1]
        raise ValueError(f"sentencepiece training failed: {reason}") from None
    sp = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    vocab_lines = "".join(f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n" for i in range(sp.GetPieceSize()))
    _write_atomic(model_path, model_bytes.getvalue())
    _write_atomic(model_path[: -len(".model")] + ".vocab", vocab_lines.encode("utf-8"))
    return SentencePieceTokenizer(model_path)
