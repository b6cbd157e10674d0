"""A thin wrapper over a sentencepiece model, plus the recipe used to train one.

Training recipe (``train_sentencepiece``), Llama-style so that decode(encode(text)) == text
for any string:

* BPE with ``byte_fallback``: characters outside the vocabulary become <0xNN> byte
  pieces instead of <unk>, so every text encodes (a newline is the piece <0x0A>).
* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``: no NFKC and
  no whitespace collapsing, so the round trip is exact.
* ``add_dummy_prefix=False``: the trainer sees lines but we encode whole documents, where
  most words at a line start follow "\\n", not a space; a dummy "▁" would make line-initial
  words tokenize differently in training and in use.
* ``hard_vocab_limit=False``: a small corpus may not support the requested vocabulary;
  the model then simply comes out smaller (``Tokenizer.vocab_size`` is the real size).

Special ids are sentencepiece's defaults: unk=0, bos=1, eos=2, no pad (-1).
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable

import sentencepiece as spm

from ..outputs import atomic_file

# Bytes (256) + unk/bos/eos: the smallest vocabulary byte_fallback allows, before any
# character of the corpus is added.
MIN_BYTE_FALLBACK_VOCAB = 259


class Tokenizer:
    """Loads ``<something>.model`` and exposes encode/decode and the special ids."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load sentencepiece model {model_path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()  # -1: the model has no pad token

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.Encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: list[str], add_eos: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts with sentencepiece's own thread pool (fast path for prepare)."""
        return self._sp.Encode(texts, add_eos=add_eos, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids) -> str:
        """Accepts a list, numpy array or torch tensor of ids."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._sp.Decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _write_atomic(path: str, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def tokenizer_fingerprint(model_path: str) -> str | None:
    """SHA-256 of a tokenizer model file (None when there is none): ids mean the same pieces
    exactly when the fingerprints agree."""
    try:
        with open(model_path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def train_sentencepiece(sentences: Iterable[str], model_path: str, vocab_size: int,
                        character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000, seed: int = 0) -> Tokenizer:
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
    return Tokenizer(model_path)
