"""Data pipeline: text -> tokenizer -> .bin/.idx token datasets -> packed GPT samples.

Stands alone (no imports from the rest of megatron_ufp4).  Names are resolved lazily so
``python -m megatron_ufp4.data.prepare`` does not pay for importing torch.
"""
import importlib

_EXPORTS = {
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetWriter": "indexed_dataset",
    "write_indexed_dataset": "indexed_dataset",
    "best_dtype": "indexed_dataset",
    "Tokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "dataset_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "GPTDataset": "gpt_dataset",
    "GlobalBatchSampler": "gpt_dataset",
    "SampleIterator": "gpt_dataset",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
