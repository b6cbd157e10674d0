"""Training on a weighted blend of Megatron-LM corpora (``data.path``): exact resume under DP=2,
tokens per corpus in metrics.jsonl, and one-line errors for a blend that cannot be used.

The corpora are the Shakespeare sample's training documents dealt into two Megatron-LM datasets.
The per-corpus counts are checked against megatron-core's own blending index.
"""
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import quiet
from dist_utils import run_ranks
from megatron_ufp4.data.indexed_dataset import IndexedDataset, write_indexed_dataset

TINY = {"model.num_layers": 2, "model.hidden_size": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.ffn_hidden_size": 128, "model.max_seq_len": 32, "model.vocab_size": 512, "data.seq_len": 32,
        "training.micro_batch_size": 2, "training.global_batch_size": 8, "training.train_steps": 4,
        "training.eval_interval": 4, "training.eval_iters": 2, "logging.interval": 2, "checkpoint.interval": 0,
        "recipe.name": "ufp4", "data.split": "90,10,0"}
WEIGHTS = (0.7, 0.3)


@pytest.fixture(scope="module")
def corpora(shakespeare_prefix, tmp_path_factory):
    """Two corpora (even / odd training documents of the sample) and the data.path blending them."""
    src = IndexedDataset(shakespeare_prefix + "_train")
    root = tmp_path_factory.mktemp("corpora")
    prefixes = [str(root / "even_text_document"), str(root / "odd_text_document")]
    for k, prefix in enumerate(prefixes):
        write_indexed_dataset(prefix, [np.asarray(src[i]) for i in range(k, len(src), 2)], src.dtype)
    return f"{WEIGHTS[0]} {prefixes[0]} {WEIGHTS[1]} {prefixes[1]}"


def _cfg(path, run_dir, extra=None):
    from megatron_ufp4.config import load_config
    over = {**TINY, "data.path": path, "training.run_dir": str(run_dir), **(extra or {})}
    return load_config("configs/tiny_dense.yaml", [f"{k}={'null' if v is None else v}" for k, v in over.items()])


def _train(rank, world, path, run_dir, extra, exit_after):
    """Train through ``Trainer.train`` (metrics.jsonl, a checkpoint at ``exit_after``); the final
    validation loss."""
    from megatron_ufp4.training.trainer import Trainer
    trainer = Trainer(_cfg(path, run_dir, extra), console=quiet)
    try:
        trainer.train(exit_after=exit_after)
        return trainer.evaluate()["loss"]
    finally:
        trainer.close()


def _rows_seen(rank, world, path, run_dir, extra):
    """The token rows this rank trains on in each step (no training: the data only)."""
    from megatron_ufp4.training.trainer import Trainer
    trainer = Trainer(_cfg(path, run_dir, extra), console=quiet)
    try:
        gbs = trainer.cfg.training.global_batch_size
        return [trainer._local_rows(step * gbs, trainer.train_ds)[0] for step in range(4)]
    finally:
        trainer.close()


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_blend_run_resumes_exactly_under_dp2_and_logs_tokens_per_corpus(corpora, tmp_path):
    dp2 = {"parallel.data": 2}
    full_val, _ = run_ranks(2, _train, corpora, tmp_path / "full", dp2, None)
    run = tmp_path / "stopped"
    run_ranks(2, _train, corpora, run, dp2, 2)
    val, _ = run_ranks(2, _train, corpora, run, dp2, None)
    full = [(r["step"], r["loss"], r["grad_norm"]) for r in _records(tmp_path / "full") if "loss" in r]
    resumed = [(r["step"], r["loss"], r["grad_norm"]) for r in _records(run) if "loss" in r]
    assert [s for s, *_ in full] == [1, 2, 3, 4] and resumed == full and val == full_val  # bit for bit

    # the samples do not depend on the layout: the DP ranks' rows of a step are the one process's
    from megatron_ufp4.training.trainer import Trainer
    trainer = Trainer(_cfg(corpora, tmp_path / "one"), console=quiet)
    trainer.close()
    rank0, rank1 = run_ranks(2, _rows_seen, corpora, tmp_path / "rows", dp2)
    gbs = TINY["training.global_batch_size"]
    for step in range(4):
        one = torch.stack([trainer.train_ds[i]["tokens"] for i in range(step * gbs, (step + 1) * gbs)])
        assert torch.equal(torch.cat([rank0[step], rank1[step]]), one)

    # tokens per corpus after every logged step: megatron-core's blending index, counted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        helpers = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    size = trainer.train_ds.num_samples
    ref = np.zeros(size, dtype=np.int16)
    helpers.build_blending_indices(ref, np.zeros(size, dtype=np.int64), np.asarray(WEIGHTS), 2, size, False)
    for n in (0, 5, 8, size, size + 3, 3 * size + 7):  # counts past the end wrap around the blend
        full, rest = divmod(n, size)
        want = full * np.bincount(ref, minlength=2) + np.bincount(ref[:rest], minlength=2)
        assert list(trainer.train_ds.samples_by_corpus(n).values()) == want.tolist(), n
    logged = [r for r in _records(tmp_path / "full") if "tokens_by_corpus" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        n = r["step"] * TINY["training.global_batch_size"]
        want = np.bincount(ref[:n], minlength=2) * TINY["data.seq_len"]
        assert r["tokens_by_corpus"] == {"even_text_document": int(want[0]), "odd_text_document": int(want[1])}


@pytest.mark.parametrize("extra, needle", [
    ({"data.path": "1 /nonexistent/corpus"}, "data.path: indexed dataset file not found: /nonexistent/corpus"),
    ({"data.path": "0.5 a b 0.5"}, "data.path: '0.5 a b 0.5' mixes weights and prefixes"),
    ({"data.split": "9,x"}, "data.split"),
    ({"data.valid_path": "/x"}, "data.split and data.valid_path exclude each other"),
    ({"data.path": None, "data.split": None, "data.valid_path": "/x"}, "data.valid_path: only used with data.path"),
])
def test_unusable_blend_is_one_line(corpora, tmp_path, extra, needle):
    from megatron_ufp4.config import ConfigError
    from megatron_ufp4.training.trainer import Trainer
    with pytest.raises((ValueError, ConfigError)) as e:
        Trainer(_cfg(corpora, tmp_path / "run", extra), console=quiet).close()
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_no_validation_share_trains_and_evaluation_says_so(corpora, tmp_path):
    """data.split=100,0,0 (every document trains): a run that does not evaluate needs no validation
    set; asking it to evaluate is one line."""
    from megatron_ufp4.training.trainer import Trainer
    trainer = Trainer(_cfg(corpora, tmp_path / "run", {"data.split": "100,0,0", "training.eval_interval": 0}),
                      console=quiet)
    try:
        assert trainer.train_step()["loss"] > 0
        with pytest.raises(ValueError, match="data.split=100,0,0 leaves no valid documents"):
            trainer.evaluate()
    finally:
        trainer.close()


def test_eval_scores_the_test_share_of_the_split(corpora, tmp_path, capsys):
    """``eval --split test``: Megatron-LM's samples of the blend's test share; a data.prefix run has none."""
    from megatron_ufp4.eval import main as eval_main
    from megatron_ufp4.training.trainer import Trainer
    trainer = Trainer(_cfg(corpora, tmp_path / "run", {"data.split": "80,10,10", "training.train_steps": 1}),
                      console=quiet)
    try:
        trainer.train()
    finally:
        trainer.close()
    out = tmp_path / "test.json"
    assert eval_main([str(tmp_path / "run"), "--split", "test", "--windows", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["split"] == "test" and res["windows"] == 4 and res["data"].startswith("data.path=")
    assert "test loss" in capsys.readouterr().out
