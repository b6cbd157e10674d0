"""Setup both trainers share: device, seeds, the prepared datasets and batches."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..data.gpt_dataset import GPTDataset
from ..data.indexed_dataset import IndexedDataset


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is cuda but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_files(prefix: str, split: str) -> str:
    p = f"{prefix}_{split}"
    if not Path(p + ".bin").is_file() or not Path(p + ".idx").is_file():
        raise FileNotFoundError(f"data.prefix: no prepared dataset {p}.bin/.idx (run megatron_ufp4.data.prepare "
                                f"or scripts/prepare_demo_corpus.sh first)")
    return p


def check_vocab(cfg: RunConfig) -> None:
    vocab_json = Path(cfg.data.prefix + ".json")
    if vocab_json.is_file():
        vocab = json.loads(vocab_json.read_text()).get("vocab_size", 0)
        if vocab > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({vocab}) in {vocab_json}")


def validation_dataset(cfg: RunConfig) -> GPTDataset:
    """Unshuffled: every evaluation sees the same samples, and draws no randomness."""
    return GPTDataset(IndexedDataset(dataset_files(cfg.data.prefix, "val"), vocab_size=cfg.model.vocab_size),
                      cfg.data.seq_len,
                      seed=cfg.training.seed, shuffle=False)


def make_batch(ds: GPTDataset, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[int(i) % len(ds)] for i in indices]
    tokens = torch.stack([it["tokens"] for it in items]).to(device)
    labels = torch.stack([it["labels"] for it in items]).to(device)
    return tokens, labels


def train_dataset(cfg: RunConfig) -> GPTDataset:
    """The shuffled training samples of the whole run (order: a function of seed and sample index)."""
    check_vocab(cfg)
    t = cfg.training
    train = IndexedDataset(dataset_files(cfg.data.prefix, "train"), vocab_size=cfg.model.vocab_size)
    return GPTDataset(train, cfg.data.seq_len, seed=t.seed, num_samples=t.train_steps * t.global_batch_size)
