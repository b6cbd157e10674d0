"""Run setup: device, threads, seeds, the datasets and batches."""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..data.blend import build_split
from ..data.gpt_dataset import GPTDataset
from ..data.indexed_dataset import IndexedDataset
from ..data.tokenizer import BaseTokenizer, configured_tokenizer
from ..linear.backends import get_backend

_CUDA_INDEX = re.compile(r"cuda:[0-9]+")


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher of torch.distributed) sets RANK and WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ


def local_rank() -> int | None:
    """This process's index on its node under torchrun (``LOCAL_RANK``), else None."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def resolve_device(name: str, local_rank: int | None = None, field: str = "training.device") -> torch.device:
    """``training.device`` -> the device this process computes on.

    ``auto``: CUDA when available, else CPU.  ``auto`` and ``cuda`` under torchrun take the
    GPU of the process's ``local_rank`` (one GPU per rank); ``cuda:N`` names one GPU and so
    only suits a single process per node.  No silent fallback: a CUDA request without a
    usable GPU is an error (``field`` names the setting in the message).
    """
    if name not in ("auto", "cpu", "cuda") and not _CUDA_INDEX.fullmatch(name):
        raise ValueError(f"{field}: must be auto, cpu, cuda or cuda:N (got {name!r})")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{field}={name} but no CUDA device is available (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'})")
    count = torch.cuda.device_count()
    if name in ("auto", "cuda"):
        index = local_rank or 0
        if index >= count:
            raise ValueError(f"{field}={name}: local rank {index} has no GPU of its own (this node has "
                             f"{count}; start at most {count} processes per node)")
        return torch.device("cuda", index)
    index = int(name.split(":")[1])
    if index >= count:
        raise ValueError(f"{field}={name}: this node has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    if local_rank not in (None, 0) or int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{field}={name} puts every local rank on one GPU; use auto or cuda under torchrun")
    return torch.device("cuda", index)


def select_device(name: str, local_rank: int | None = None, field: str = "training.device") -> torch.device:
    """``resolve_device``, and a CUDA result made this process's current device: Triton launches,
    pinned host staging buffers and NCCL use the current device, which is GPU 0 until set, so a
    single process on ``cuda:N`` would otherwise also open a context (and launch) on GPU 0."""
    device = resolve_device(name, local_rank, field)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def check_backend_device(backend: str, device: torch.device) -> None:
    """Refuse at setup, in one line, a GEMM backend that cannot run on ``device`` (e.g.
    ``triton`` on a CPU without the Triton interpreter): never a fallback to another backend."""
    try:
        get_backend(backend).check_device(device)
    except ValueError as e:
        raise ValueError(f"gemm.backend={backend} (training.device={device}): {e}") from None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; all cores where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op thread count and return it.  ``requested`` > 0 is used as given;
    0 respects ``OMP_NUM_THREADS`` when set, else splits the usable cores between the
    processes torchrun started on this node (``LOCAL_WORLD_SIZE``): more threads than cores
    makes processes preempt each other mid-GEMM, several times slower on a small box."""
    if requested <= 0:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            return torch.get_num_threads()
        requested = max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(requested)
    return requested


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


def run_tokenizer(cfg: RunConfig, needed_for: str | None = None) -> BaseTokenizer | None:
    """The tokenizer the run's token ids mean (``data.tokenizer``, else the one stored with the
    ``data.prefix`` dataset).  A ``data.path`` run without ``data.tokenizer`` has none: None, or a
    ``ValueError`` naming what needs one when ``needed_for`` says."""
    try:
        tok = configured_tokenizer(cfg.data.tokenizer, cfg.data.prefix if cfg.data.path is None else None)
    except FileNotFoundError:
        if needed_for is None:
            return None
        raise
    except ValueError as e:
        raise ValueError(f"data.tokenizer: {e}") from None
    if tok is None and needed_for is not None:
        raise ValueError(f"{needed_for} needs the tokenizer of the data.path corpora: set data.tokenizer (a "
                         "sentencepiece .model, a tokenizer.json or a directory holding one)")
    return tok


def run_tokenizer_file(cfg: RunConfig) -> str | None:
    """The file whose fingerprint a run records (None: the run has no tokenizer)."""
    tok = run_tokenizer(cfg)
    return tok.path if tok is not None else None


def check_vocab(cfg: RunConfig) -> None:
    """The tokenizer's ids fit the model: one line naming both otherwise.  A prepared dataset's
    vocabulary is read from its ``<prefix>.json`` (no tokenizer load)."""
    vocab_json = Path(cfg.data.prefix + ".json")
    if cfg.data.tokenizer:
        vocab, where = run_tokenizer(cfg).vocab_size, f"data.tokenizer={cfg.data.tokenizer}"
    elif cfg.data.path is None and vocab_json.is_file():
        vocab, where = json.loads(vocab_json.read_text()).get("vocab_size", 0), str(vocab_json)
    else:
        return
    if vocab > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({vocab}) in {where}")


def validation_size(cfg: RunConfig) -> int:
    """Samples of a Megatron-LM validation set: what Megatron-LM builds for the run's evaluations
    (``eval_iters x global batch x (train_steps // eval_interval + 1)``), so that its order (a
    function of its size) is Megatron-LM's; our evaluations use its first windows (more, when
    ``training.eval_windows`` asks for more than that: the order then is not Megatron-LM's)."""
    t = cfg.training
    rounds = t.train_steps // t.eval_interval + 1 if t.eval_interval > 0 else 1
    windows = t.eval_windows if t.eval_windows is not None else t.eval_iters * t.micro_batch_size
    return max(windows, t.eval_iters * t.global_batch_size * rounds, 1)


def _split_samples(cfg: RunConfig, split: str, size: int):
    """Samples of ``split`` of the ``data.path`` corpora; one line naming the setting otherwise
    (``BlendError``, a ``ValueError``, names it itself)."""
    sources = cfg.data.corpora()
    if split not in sources:
        if cfg.data.valid_path is not None or cfg.data.test_path is not None:
            raise ValueError(f"data.{split}_path: not set, and the run names its sets with data.valid_path / "
                             "data.test_path; name this one too")
        raise ValueError(f"data.split={cfg.data.split or '969,30,1'} leaves no {split} documents; give it a share "
                         f"(e.g. 969,30,1) or name the set with data.{split}_path")
    source = sources[split]
    try:
        return build_split(source, cfg.data.seq_len, cfg.training.seed, size, cfg.model.vocab_size)
    except FileNotFoundError as e:
        raise ValueError(f"{source.field}: {e}") from None


def validation_dataset(cfg: RunConfig, split: str = "valid"):
    """Our prepared datasets: unshuffled windows, every evaluation sees the same samples and draws no
    randomness.  ``data.path``: Megatron-LM's samples of the blend's ``split`` (valid or test; a
    fixed order)."""
    if cfg.data.path is not None:
        return _split_samples(cfg, split, validation_size(cfg))
    if split != "valid":
        raise ValueError(f"a {split} set needs data.path corpora (a {split} share of data.split, or "
                         f"data.{split}_path); {cfg.data.describe()} has train and val splits only")
    return GPTDataset(IndexedDataset(dataset_files(cfg.data.prefix, "val"), vocab_size=cfg.model.vocab_size),
                      cfg.data.seq_len,
                      seed=cfg.training.seed, shuffle=False)


def make_batch(ds: GPTDataset, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``indices`` (modulo the dataset) as (tokens, labels) on ``device``.

    For a GPU the batch is staged in pinned host memory and copied with ``non_blocking``: the
    copy overlaps the previous step's kernels, and the stream orders it before its first use.
    """
    items = [ds[int(i) % len(ds)] for i in indices]
    tokens = torch.stack([it["tokens"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    device = torch.device(device)
    if device.type == "cpu":
        return tokens, labels
    return (tokens.pin_memory().to(device, non_blocking=True), labels.pin_memory().to(device, non_blocking=True))


def train_dataset(cfg: RunConfig):
    """The shuffled training samples of the whole run (order: a function of seed and sample index):
    a ``GPTDataset`` over ``data.prefix``, or Megatron-LM's samples of the ``data.path`` blend."""
    t = cfg.training
    check_vocab(cfg)
    if cfg.data.path is not None:
        return _split_samples(cfg, "train", t.train_steps * t.global_batch_size)
    train = IndexedDataset(dataset_files(cfg.data.prefix, "train"), vocab_size=cfg.model.vocab_size)
    return GPTDataset(train, cfg.data.seq_len, seed=t.seed, num_samples=t.train_steps * t.global_batch_size)
