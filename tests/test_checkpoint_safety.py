"""Loading a checkpoint never executes code, and a bad one is refused with one line.

Attacks: pickles whose ``__reduce__`` calls ``os.system("touch MARKER")`` or
``builtins.exec`` -- in a ``state.pt`` (torch.save zip whose data.pkl is replaced), in a
sharded checkpoint's ``.metadata`` (which torch's own FileSystemReader unpickles without
restriction), and as a pickled "bytes" entry of a DCP checkpoint (which torch's load
planners unpickle with ``weights_only=False``).  Each test first shows its payload is live
(stock unpickling creates the marker), then that every entry point refuses it: exit status
2 (torchrun: non-zero), exactly one stderr line naming the file, and no marker.

Damage: truncated / garbage / missing ``.distcp``, truncated ``.metadata``, missing
``partitions.json`` (of the sharded checkpoint training writes), a ``state.pt`` of earlier
versions without a key (datasets: tests/test_data_errors.py).
Conversion: the single-process trainer's ``state.pt`` of earlier versions -> ``to-dcp`` ->
resume under torchrun; ``to-dcp`` -> ``to-single`` keeps every value.
"""
from __future__ import annotations

import importlib.util
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

try:
    from .conftest import CONFIGS, read_metrics
except ImportError:
    from conftest import CONFIGS, read_metrics
from megatron_ufp4.training.checkpoint import CheckpointError
from megatron_ufp4.training.checkpoint_formats import read_checkpoint
from megatron_ufp4.training.safe_load import (ALLOWED_GLOBALS, load_dcp, load_dcp_full, safe_reader,
                                              verify_dcp_metadata)

from checkpoint_attacks import (DAMAGE, PAYLOADS, REFUSED_NAME, _copy_run, _damage, _evil_state_pt, _one_line,
                                _System)


# -- what a real .metadata holds ----------------------------------------------------------------------
class _Recorder(pickle.Unpickler):
    def __init__(self, f, seen):
        super().__init__(f)
        self.seen = seen

    def find_class(self, module, name):
        self.seen.add((module, name))
        return super().find_class(module, name)


def _globals_of(meta: Path) -> set:
    seen: set = set()
    with open(meta, "rb") as f:
        _Recorder(f, seen).load()
    return seen


def test_allowlist_covers_what_dcp_writes(sharded, legacy_run, tool, tmp_path):
    import torch.distributed.checkpoint as dcp

    ckpt, _ = sharded
    converted = tmp_path / "converted"  # to-dcp of a state.pt of earlier versions
    assert tool.main(["to-dcp", str(legacy_run[0] / "checkpoints" / "step_00000002" / "state.pt"),
                      str(converted)]) == 0
    sd = {f"t.{d}": torch.ones(3, 2, dtype=getattr(torch, d))
          for d in ("float32", "bfloat16", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")}
    sd.update({"scalar": torch.tensor(3), "empty": torch.zeros(0, 4), "view": torch.arange(12.0).view(3, 4).t()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(tmp_path / "survey"), no_dist=True)
    for meta in (ckpt / ".metadata", converted / ".metadata", tmp_path / "survey" / ".metadata"):
        seen = _globals_of(meta)
        dtypes = {(m, n) for m, n in seen if m == "torch" and isinstance(getattr(torch, n), torch.dtype)}
        assert seen - dtypes <= ALLOWED_GLOBALS, seen - dtypes - ALLOWED_GLOBALS
    loaded = load_dcp_full(tmp_path / "survey")
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())


# -- state.pt ----------------------------------------------------------------------------------------
@pytest.fixture
def evil_run(tmp_path, request):
    kind = request.param
    marker = tmp_path / "MARKER"
    run = tmp_path / "evil_run"
    ckpt = run / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    _evil_state_pt(ckpt / "state.pt", PAYLOADS[kind](marker))
    return kind, run, ckpt / "state.pt", marker


@pytest.mark.parametrize("evil_run", list(PAYLOADS), indirect=True)
def test_malicious_state_pt_payload_is_live(evil_run):
    _, _, f, marker = evil_run
    torch.load(f, weights_only=False)  # what a careless loader would do
    assert marker.exists()


@pytest.mark.parametrize("evil_run", list(PAYLOADS), indirect=True)
@pytest.mark.parametrize("entry", ["train", "eval", "sample", "to-dcp"])
def test_malicious_state_pt_is_refused_everywhere(evil_run, entry, tiny_overrides, capsys, tool):
    kind, run, f, marker = evil_run
    if entry == "train":
        from megatron_ufp4 import train
        rc = train.main([str(CONFIGS / "tiny_dense.yaml"), *tiny_overrides("tiny_dense", run)])
    elif entry in ("eval", "sample"):
        rc = importlib.import_module(f"megatron_ufp4.{entry}").main([str(run)])
    else:
        rc = tool.main(["to-dcp", str(f), str(run / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    line = _one_line(err)
    assert str(f) in line and f"references {REFUSED_NAME[kind]}" in line, line


def _run_without(legacy_run, tmp_path, key: str) -> tuple[Path, Path]:
    """A copy of the run with a ``state.pt`` checkpoint of earlier versions that lacks ``key``."""
    src = legacy_run[0]
    run = tmp_path / "run"
    shutil.copytree(src / "checkpoints", run / "checkpoints")
    f = run / "checkpoints" / "step_00000002" / "state.pt"
    state = torch.load(f, weights_only=True)
    del state[key]
    torch.save(state, f)
    return run, f


@pytest.mark.parametrize("key", ["optimizer", "model", "step", "skipped_total", "config"])
def test_state_pt_missing_key_is_one_line_on_resume(legacy_run, tiny_overrides, tmp_path, capsys, key):
    from megatron_ufp4 import train

    run, f = _run_without(legacy_run, tmp_path, key)
    overrides = tiny_overrides("tiny_dense", run, "recipe.name=ufp4", "training.train_steps=4",
                               "schedule.warmup_steps=1", "training.eval_interval=0")
    assert train.main([str(CONFIGS / "tiny_dense.yaml"), *overrides]) == 2
    assert _one_line(capsys.readouterr().err) == f"error: checkpoint {f} lacks {key!r}"


def test_state_pt_without_rng_states_resumes(legacy_run, tiny_overrides, tmp_path, capsys):
    """The RNG states a ``state.pt`` of earlier versions holds are not needed any more (stochastic
    rounding draws from keys of (seed, step, micro-batch), the data order from the step): a file
    without them resumes."""
    from megatron_ufp4 import train

    run, f = _run_without(legacy_run, tmp_path, "rng")
    overrides = tiny_overrides("tiny_dense", run, "recipe.name=ufp4", "training.train_steps=4",
                               "schedule.warmup_steps=1", "training.eval_interval=0")
    assert train.main([str(CONFIGS / "tiny_dense.yaml"), *overrides]) == 0
    assert f"resumed from {f.parent} at step 2" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [3, 4]


@pytest.mark.parametrize("key,ok", [("optimizer", True), ("rng", True), ("model", False), ("step", False)])
def test_eval_needs_only_model_config_step(legacy_run, tmp_path, capsys, key, ok):
    from megatron_ufp4 import eval as eval_cli

    run, f = _run_without(legacy_run, tmp_path, key)
    rc = eval_cli.main([str(run), "--iters", "1"])
    captured = capsys.readouterr()
    if ok:
        assert rc == 0 and "validation loss" in captured.out, captured.err
    else:
        assert rc == 2 and _one_line(captured.err) == f"error: checkpoint {f} lacks {key!r}"


def test_read_checkpoint_refuses_a_non_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"does not hold a training state \(it holds a Tensor\)"):
        read_checkpoint(tmp_path)


# -- sharded checkpoints: .metadata --------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_malicious_metadata_payload_is_live_with_stock_torch(sharded, tmp_path, kind):
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = _copy_run(sharded[0], tmp_path)
    marker = tmp_path / "MARKER"
    (ckpt / ".metadata").write_bytes(pickle.dumps(PAYLOADS[kind](marker)))
    with pytest.raises(Exception):
        FileSystemReader(str(ckpt)).read_metadata()
    assert marker.exists()


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_malicious_metadata_is_refused_by_to_single(sharded, tmp_path, capsys, tool, kind):
    ckpt = _copy_run(sharded[0], tmp_path)
    marker = tmp_path / "MARKER"
    (ckpt / ".metadata").write_bytes(pickle.dumps(PAYLOADS[kind](marker)))
    assert tool.main(["to-single", str(ckpt), str(tmp_path / "x.pt")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (f"convert_checkpoint.py: error: refusing to load {ckpt / '.metadata'}: it references "
                    f"{REFUSED_NAME[kind]}, which a checkpoint never contains")
    assert not marker.exists() and not (tmp_path / "x.pt").exists()
    with pytest.raises(CheckpointError, match="references"):  # and DCP loads through the same check
        load_dcp({}, ckpt, no_dist=True)
    assert not marker.exists()


def test_pickled_bytes_entry_is_refused(tmp_path):
    """A checkpoint whose metadata is made only of allowed classes but declares a non-tensor
    entry: DCP's planners would torch.load(weights_only=False) its payload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"x": torch.zeros(2), "evil": _System(marker)}, checkpoint_id=str(ckpt), no_dist=True)
        assert not marker.exists()
        probe = {"x": torch.zeros(2), "evil": None}
        dcp.load(probe, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)  # stock torch runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"entry 'evil' is a pickled object"):
        verify_dcp_metadata(ckpt)
    with pytest.raises(CheckpointError, match=r"entry 'evil' is a pickled object"):
        load_dcp_full(ckpt)
    # defence in depth: the reader refuses a bytes read even when handed unverified metadata
    with open(ckpt / ".metadata", "rb") as f:
        raw_md = pickle.load(f)  # safe here: written by this test
    with warnings.catch_warnings(), pytest.raises(BaseException) as info:  # DCP's CheckpointException
        warnings.simplefilter("ignore")
        dcp.load({"x": torch.zeros(2), "evil": None}, storage_reader=safe_reader(ckpt, raw_md), no_dist=True)
    assert "pickled object" in str(info.value)
    assert not marker.exists()


# -- sharded checkpoints: damage ------------------------------------------------------------------------
@pytest.mark.parametrize("case", [*(f"payload:{k}" for k in PAYLOADS), *(f"damage:{w}" for w in DAMAGE)])
def test_bad_sharded_checkpoint_is_one_line_on_resume(sharded, tmp_path, capsys, case):
    """Resuming (the train CLI, one process) from a sharded checkpoint whose .metadata carries a
    payload or that is damaged: exit 2, one stderr line naming the file, nothing executed."""
    from megatron_ufp4 import train

    ckpt_src, overrides = sharded
    ckpt = _copy_run(ckpt_src, tmp_path)
    kind, _, what = case.partition(":")
    marker = tmp_path / "MARKER"
    if kind == "payload":
        (ckpt / ".metadata").write_bytes(pickle.dumps(PAYLOADS[what](marker)))
        needle = f"refusing to load {ckpt / '.metadata'}: it references {REFUSED_NAME[what]}"
    else:
        needle = _damage(ckpt, what)
    over = [*[o for o in overrides if not o.startswith("training.run_dir=")], f"training.run_dir={tmp_path / 'run'}",
            "training.eval_interval=0"]
    capsys.readouterr()
    assert train.main([str(CONFIGS / "tiny_dense.yaml"), *over]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and needle in line, line
    assert not marker.exists()


@pytest.mark.parametrize("what", DAMAGE)
def test_damaged_sharded_checkpoint_to_single_is_one_line(sharded, tmp_path, capsys, tool, what):
    ckpt = _copy_run(sharded[0], tmp_path)
    needle = _damage(ckpt, what)
    assert tool.main(["to-single", str(ckpt), str(tmp_path / "x.pt")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("convert_checkpoint.py: error: ") and needle in line, line
    if what == "missing_partitions":
        assert "lacks partitions.json" in line
    assert not (tmp_path / "x.pt").exists()


