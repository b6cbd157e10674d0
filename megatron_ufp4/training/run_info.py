"""``<run_dir>/run_info.json``: what a run is, written once when it starts from step 0.

- ``label``: what actually runs (``Recipe.label``; a recipe with no quantized GEMM is
  ``bf16`` under ``training.dtype=bf16`` and ``fp32`` under ``fp32``, since that is the
  precision its GEMMs then run in; under a precision schedule every phase's label with its
  start step, ``ufp4>bf16@180``, and ``schedule``: the phases);
- ``fingerprint.init``: a SHA-256 of the initial parameters (names, shapes, fp32 bytes) and
  ``fingerprint.data_order``: of the run's training-sample order, so that a study can check,
  not assume, that the arms of one seed start from the same weights and see the same data;
  ``fingerprint.tokenizer``: of the dataset's tokenizer model, checked when the run resumes
  and when a checkpoint of it is evaluated (``check_same_tokenizer``);
- the recipe, backend, dtype, seeds and threads the run used.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..data.blend import BlendedSamples
from ..data.gpt_dataset import GPTDataset
from ..data.tokenizer import tokenizer_fingerprint
from ..fp4.schedule import PrecisionSchedule
from ..outputs import write_synced
from .run_setup import run_tokenizer_file

RUN_INFO = "run_info.json"


def precision_label(recipe, dtype: str) -> str:
    quantized = any(recipe.gemm(g).quantized for g in ("fprop", "dgrad", "wgrad"))
    return recipe.label() if quantized else ("bf16" if dtype == "bf16" else "fp32")


def params_fingerprint(named_parameters) -> str:
    """SHA-256 of (name, shape, fp32 bytes) of every parameter, in name order (buffers such
    as RHT signs and SR states are left out: they belong to the recipe, not the weights)."""
    h = hashlib.sha256()
    for name, p in sorted(named_parameters, key=lambda kv: kv[0]):
        t = p.detach().float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def data_order_fingerprint(ds: GPTDataset | BlendedSamples) -> str:
    """SHA-256 of the window length, the epoch size and the order of every training sample; for a
    ``data.path`` blend, of its draws and each corpus's Megatron-LM indices (documents, sample
    boundaries, shuffle)."""
    if isinstance(ds, BlendedSamples):
        h = hashlib.sha256(f"blend:{ds.seq_len}:{ds.num_samples};".encode())
        arrays = [ds.corpus, ds.within]
        for corpus in ds.datasets:
            arrays += [corpus.document_index, corpus.sample_index, corpus.shuffle_index]
        for arr in arrays:  # native bytes with their dtype: no widened copies of large indices
            h.update(f"{arr.dtype.str}{arr.shape};".encode())
            h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
        return h.hexdigest()
    h = hashlib.sha256(f"{ds.seq_len}:{ds.tokens_per_epoch}:{ds.num_samples};".encode())
    left = ds.num_samples
    for epoch in range(ds.num_epochs):
        order = ds.epoch_order(epoch)[:left]
        h.update(np.ascontiguousarray(order, dtype=np.int64).tobytes())
        left -= len(order)
    return h.hexdigest()


def write_run_info(run_dir: Path, cfg, schedule, named_parameters, train_ds, threads: int) -> dict:
    """``schedule``: the run's ``PrecisionSchedule`` (or a ``Recipe``: one phase)."""
    t = cfg.training
    if not hasattr(schedule, "phases"):
        schedule = PrecisionSchedule.single(schedule)
    recipe = schedule.base
    info = {
        "label": schedule.label(lambda r: precision_label(r, t.dtype)),
        "recipe": recipe.name,
        "backend": cfg.gemm.backend,
        "dtype": t.dtype,
        "seed": t.seed,
        "sr_seed": t.sr_seed if t.sr_seed is not None else t.seed,
        "threads": threads,
        "torch": torch.__version__,
        "fingerprint": {"init": params_fingerprint(named_parameters) if named_parameters is not None else None,
                        "data_order": data_order_fingerprint(train_ds),
                        "tokenizer": tokenizer_fingerprint(run_tokenizer_file(cfg))},
    }
    if schedule.scheduled:
        info["schedule"] = schedule.to_list()
    write_synced(Path(run_dir) / RUN_INFO, json.dumps(info, indent=1) + "\n")
    return info


def read_run_info(run_dir: Path) -> dict | None:
    p = Path(run_dir) / RUN_INFO
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_same_tokenizer(run_dir: Path, cfg, field: str = "data.prefix") -> None:
    """Refuse (one line) a dataset whose tokenizer is not the one the run at ``run_dir`` started
    with: its token ids would mean other pieces (a re-prepared dataset, another corpus).  Runs
    from before the fingerprint was recorded are not checked.  ``field`` names the setting that
    chose the data (``data.prefix``, ``--data-prefix``)."""
    from .checkpoint import CheckpointError

    info = read_run_info(run_dir) or {}
    fp = info.get("fingerprint") if isinstance(info, dict) else None
    then = fp.get("tokenizer") if isinstance(fp, dict) else None
    path = run_tokenizer_file(cfg)
    now = tokenizer_fingerprint(path) if path else None
    if then is not None and now != then:
        source = f"data.tokenizer {cfg.data.tokenizer}" if cfg.data.tokenizer else f"{field} {cfg.data.prefix}"
        has = "no tokenizer" if now is None else f"another tokenizer (sha256 {now[:12]})"
        raise CheckpointError(f"{source} has {has} than run {run_dir} trained with (sha256 {then[:12]}): "
                              "its token ids would mean other pieces (was the dataset prepared again?)")
