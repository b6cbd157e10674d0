"""Hugging Face checkpoint files: (sharded) safetensors, the tokenizer, an atomic output directory.

``safetensors`` and ``tokenizers`` are imported only here, inside the functions that need
them (extra ``hf``: ``pip install -e ".[hf]"``); the rest of the package never imports them.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import torch

from .. import outputs
from .mapping import HFMappingError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD = "5GB"  # transformers' save_pretrained default
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def require(module: str):
    """Import an optional dependency or raise one line saying how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HFMappingError(f"{module} is not installed: pip install transformers safetensors "
                             "(or pip install -e \".[hf]\")") from None


def parse_size(text: str | int) -> int:
    """"5GB" / "500MB" / "2GiB" / 1000 -> bytes (decimal units as transformers uses)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise HFMappingError(f"--max-shard-size: expected a size such as 5GB, 500MB or 1000 (got {text!r})")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def write_safetensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + the index when the
    tensors exceed ``max_shard_bytes`` (shards filled in key order; a tensor larger than
    the limit gets a shard of its own, as transformers does).  Returns the file names."""
    st = require("safetensors.torch")
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for k in tensors:
        if shards[-1] and used + sizes[k] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += sizes[k]
    if len(shards) == 1:
        st.save_file(tensors, str(out / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        st.save_file({k: tensors[k] for k in keys}, str(out / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX]


def read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (single file or sharded with an index)."""
    st = require("safetensors.torch")
    if (d / INDEX).is_file():
        files = sorted(set(json.loads((d / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
    elif (d / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise HFMappingError(f"{d} has no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
    out = {}
    for f in files:
        if not (d / f).is_file():
            raise HFMappingError(f"{d / f} is missing (listed in {INDEX})")
        try:
            out.update(st.load_file(str(d / f)))
        except Exception as e:  # a truncated / foreign file
            raise HFMappingError(f"cannot read {d / f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling of ``final``; on success it becomes ``final`` (which must not
    exist, or be an empty directory), on any error it is removed: nothing partial is left."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise HFMappingError(f"{final} exists and is not an empty directory")
    with outputs.atomic_dir(final) as tmp:
        yield tmp


# -- tokenizer: our sentencepiece BPE model as tokenizer.json (no conversion on load) -------------------
def _bpe_merges(sp, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges in priority order: a piece's id is its merge rank (pieces are
    stored best score first), each piece made from every split into two vocabulary pieces."""
    merges = []
    for i in range(sp.GetPieceSize()):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or sp.IsUnused(i):
            continue
        piece = sp.IdToPiece(i)
        splits = [(vocab[piece[:j]], vocab[piece[j:]], piece[:j], piece[j:]) for j in range(1, len(piece))
                  if piece[:j] in vocab and piece[j:] in vocab]
        merges += [(i, a, b, x, y) for a, b, x, y in sorted(splits)]
    return [(x, y) for *_, x, y in sorted(merges)]


PROBE = ["Hello world", "  two  spaces\nnew line\n\n\tTab", "   x", "émoji 🤖 ünïcode 漢字 ¿Qué?", "3.14159 2026",
         "<s> </s> <unk> literal", "don't WON'T", " leading", "trailing  "]


def export_tokenizer(model_path: Path, out: Path, max_len: int, sample: str = "") -> dict:
    """tokenizer.model (copied), tokenizer.json, tokenizer_config.json, special_tokens_map.json;
    returns the special ids for config.json.  Refused when the sentencepiece model is not a
    BPE model this pipeline reproduces (ids compared on probe and sample text)."""
    import sentencepiece as spm

    tk = require("tokenizers")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.GetPieceSize()
    vocab = {sp.IdToPiece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)]
    bpe = tk.models.BPE(vocab=vocab, merges=_bpe_merges(sp, vocab), unk_token=sp.IdToPiece(sp.unk_id()),
                        fuse_unk=True, byte_fallback=True)
    tok = tk.Tokenizer(bpe)
    tok.normalizer = tk.normalizers.Replace(" ", "▁")  # identity normalisation, no dummy prefix
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(),
                                        tk.decoders.Fuse()])
    tok.add_special_tokens([tk.AddedToken(sp.IdToPiece(i), special=True, normalized=False) for i in special])
    # ours never turns "<s>" in text into the BOS id: split_special_tokens (set below) does the same in HF
    tok.encode_special_tokens = True
    for text in [*PROBE, sample]:
        ids = sp.Encode(text)
        if tok.encode(text, add_special_tokens=False).ids != ids:
            raise HFMappingError(f"tokenizer {model_path}: its sentencepiece settings (normalisation, dummy "
                                 f"prefix, model type) are not reproduced by the export (ids differ on {text[:30]!r})")
    tok.encode_special_tokens = False
    shutil.copyfile(model_path, out / "tokenizer.model")
    tok.save(str(out / "tokenizer.json"))
    name = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    tokens = {f"{k}_token": sp.IdToPiece(i) for k, i in name.items() if i >= 0}
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **tokens, "add_bos_token": False, "add_eos_token": False,
        "split_special_tokens": True, "clean_up_tokenization_spaces": False,
        "model_max_length": int(max_len)})
    write_json(out / "special_tokens_map.json", tokens)
    return {f"{k}_token_id": (i if i >= 0 else None) for k, i in name.items() if k != "unk"}


def copy_hf_tokenizer(tok, out: Path, max_len: int) -> dict:
    """A Hugging Face tokenizer.json with a tokenizer_config.json naming the end of document the data
    was prepared with; returns the special ids for config.json.  Its post-processor (e.g. a template
    adding BOS) is dropped: the model was trained on the plain encoding, and transformers would
    otherwise add tokens it never saw (checked on probe texts)."""
    tk = require("tokenizers")
    lib = tk.Tokenizer.from_file(tok.path)
    lib.post_processor = None
    for text in PROBE:
        if lib.encode(text).ids != tok.encode(text):
            raise HFMappingError(f"tokenizer {tok.path}: its encoding with special tokens differs from the plain "
                                 f"one the model was trained on (on {text[:30]!r}) even without its post-processor")
    lib.save(str(out / "tokenizer.json"))
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    tokens = {f"{k}_token": tok.id_to_token(i) for k, i in ids.items() if i >= 0}
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **tokens, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": int(max_len)})
    write_json(out / "special_tokens_map.json", tokens)
    return {f"{k}_token_id": (i if i >= 0 else None) for k, i in ids.items()}
