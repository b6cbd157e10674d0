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

import builtins
import importlib.util
import io
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from .conftest import CONFIGS, REPO_ROOT, assert_state_equal, quiet, read_metrics, snapshot, write_legacy_state_file
except ImportError:
    from conftest import CONFIGS, REPO_ROOT, assert_state_equal, quiet, read_metrics, snapshot, write_legacy_state_file
from megatron_ufp4.config import dump_config, load_config
from megatron_ufp4.training.checkpoint import CheckpointError
from megatron_ufp4.training.checkpoint_formats import read_checkpoint
from megatron_ufp4.training.safe_load import (ALLOWED_GLOBALS, load_dcp, load_dcp_full, safe_reader,
                                              verify_dcp_metadata)

# the repository on the path: the subprocesses run from other directories (tmp_path)
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# -- payloads ------------------------------------------------------------------------------------------
class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


PAYLOADS = {"os.system": _System, "exec": _Exec}
REFUSED_NAME = {"os.system": "posix.system", "exec": "builtins.exec"}


def _evil_state_pt(path: Path, payload) -> None:
    """A torch.save zip (so torch.load takes its normal path) whose data.pkl runs ``payload``."""
    buf = io.BytesIO()
    torch.save({"model": {}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as out:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps({"model": payload, "config": {}, "step": 1}, protocol=2)
            out.writestr(item, data)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO_ROOT / "tools" / "convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module")
def sharded(trained_run):
    """The sharded checkpoint (step 2) the trained single-process run wrote (tests damage copies of it)."""
    run_dir, overrides = trained_run
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / ".metadata").is_file() and not (ckpt / "state.pt").exists()
    return ckpt, overrides


@pytest.fixture(scope="module")
def legacy_run(trained_run, tmp_path_factory):
    """A copy of the trained run whose step-2 checkpoint is the same state as the ``state.pt``
    (+ ``config.yaml``) the single-process trainer of earlier versions wrote.  Returns
    (run_dir, overrides, truth): truth = model / optimizer (by name) state dicts of that state,
    from a trainer resumed from the sharded original."""
    from megatron_ufp4.training.trainer import Trainer

    src, overrides = trained_run
    run = tmp_path_factory.mktemp("legacy") / "run"
    shutil.copytree(src, run)
    over = [*[o for o in overrides if not o.startswith("training.run_dir=")], f"training.run_dir={run}"]
    trainer = Trainer(load_config(CONFIGS / "tiny_dense.yaml", over), console=quiet)
    assert trainer.step == 2
    truth = {"model": snapshot(trainer.model.state_dict()), "optimizer": snapshot(trainer.optimizer.state_dict())}
    ckpt = run / "checkpoints" / "step_00000002"
    shutil.rmtree(ckpt)
    write_legacy_state_file(trainer, ckpt / "state.pt")
    (ckpt / "config.yaml").write_text(dump_config(trainer.cfg), encoding="utf-8")
    trainer.close()
    return run, over, truth


def _copy_run(ckpt: Path, tmp_path: Path) -> Path:
    """A run dir holding only a copy of checkpoint ``ckpt``; returns the copy's checkpoint dir."""
    dst = tmp_path / "run" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, dst)
    return dst


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
def _damage(ckpt: Path, what: str) -> str:
    """Apply ``what`` to ``ckpt``; returns a substring the one-line error must contain."""
    data = ckpt / "__0_0.distcp"
    if what == "truncated_distcp":
        data.write_bytes(data.read_bytes()[:1000])
        return f"{data} is truncated: 1000 bytes"
    if what == "garbage_distcp":
        data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))
        return f"cannot read {data}: damaged"
    if what == "missing_distcp":
        data.unlink()
        return f"checkpoint {ckpt} lacks __0_0.distcp, which its .metadata lists"
    if what == "truncated_metadata":
        meta = ckpt / ".metadata"
        meta.write_bytes(meta.read_bytes()[:3000])
        return f"cannot read {meta}: damaged"
    if what == "missing_partitions":
        (ckpt / "partitions.json").unlink()
        return "partitions.json"
    raise AssertionError(what)


DAMAGE = ["truncated_distcp", "garbage_distcp", "missing_distcp", "truncated_metadata", "missing_partitions"]


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


# -- torchrun ----------------------------------------------------------------------------------------
_AGENT_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # torchrun's own log lines (its failure summary follows)


def _torchrun(overrides, *extra, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megatron_ufp4.train", str(CONFIGS / "tiny_dense.yaml"), *overrides, *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _rank_lines(err: str) -> list[str]:
    """What the ranks printed: stderr up to torchrun's report of the failed job."""
    out = []
    for line in err.splitlines():
        if _AGENT_LOG.match(line):
            break
        if line.strip():
            out.append(line)
    return out


def _assert_one_rank_line(proc, needle: str) -> None:
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert not re.search(r"^\[rank\d+\]", proc.stderr, re.M), proc.stderr[-3000:]  # no rank traceback
    lines = _rank_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-3000:]


def _tp2(overrides, run: Path) -> list[str]:
    return [*[o for o in overrides if not o.startswith("training.run_dir=")], f"training.run_dir={run}",
            "parallel.tensor=2", "training.eval_interval=0"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_malicious_metadata_is_refused_on_torchrun_resume(sharded, tmp_path, kind):
    ckpt_src, overrides = sharded
    ckpt = _copy_run(ckpt_src, tmp_path)
    marker = tmp_path / "MARKER"
    (ckpt / ".metadata").write_bytes(pickle.dumps(PAYLOADS[kind](marker)))
    proc = _torchrun(_tp2(overrides, tmp_path / "run"))
    _assert_one_rank_line(proc, f"refusing to load {ckpt / '.metadata'}: it references {REFUSED_NAME[kind]}")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("what", DAMAGE)
def test_damaged_sharded_checkpoint_is_one_line_on_torchrun_resume(sharded, tmp_path, what):
    ckpt_src, overrides = sharded
    ckpt = _copy_run(ckpt_src, tmp_path)
    needle = _damage(ckpt, what)
    _assert_one_rank_line(_torchrun(_tp2(overrides, tmp_path / "run")), needle)


@pytest.mark.slow
def test_malicious_state_pt_is_refused_by_the_real_clis(tmp_path):
    """The same refusals in real interpreters (stderr as a user sees it, warnings included)."""
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    f = run / "checkpoints" / "step_00000001" / "state.pt"
    _evil_state_pt(f, _System(marker))
    cmds = {"eval": [sys.executable, "-m", "megatron_ufp4.eval", str(run)],
            "sample": [sys.executable, "-m", "megatron_ufp4.sample", str(run)],
            "to-dcp": [sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), "to-dcp", str(f),
                       str(tmp_path / "out")]}
    procs = {k: subprocess.Popen(c, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in cmds.items()}
    for k, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, (k, err[-2000:])
        line = _one_line(err)
        assert str(f) in line and "references posix.system" in line, (k, line)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["to-dcp", "direct"])
def test_single_process_checkpoint_converts_and_resumes_under_torchrun(trained_run, legacy_run, tmp_path, tool,
                                                                       how):
    """Single-process run stopped after step 2, its checkpoint in the ``state.pt`` form of earlier
    versions -> to-dcp -> TP=2 torchrun resume for step 3 (``direct``: the job resumes from the
    ``state.pt`` itself, through a temporary sharded copy that it removes).

    Reference: the single-process run continued to step 3 (exact: see test_checkpoint).  The
    TP=2 step differs from it only in the order of FP32 sums and, through that, in a rare
    flipped FP4 rounding: the ufp4 bound of test_distributed_training (1e-3 relative)."""
    from megatron_ufp4 import train
    from megatron_ufp4.training.inference import load_trained_model

    src, overrides = trained_run
    ckpt_file = legacy_run[0] / "checkpoints" / "step_00000002" / "state.pt"
    reference = tmp_path / "reference"
    shutil.copytree(src / "checkpoints", reference / "checkpoints")
    ref_over = [*[o for o in overrides if not o.startswith("training.run_dir=")], f"training.run_dir={reference}",
                "training.eval_interval=0"]
    assert train.main([str(CONFIGS / "tiny_dense.yaml"), *ref_over, "--exit-after", "3"]) == 0
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(reference) if "loss" in r}[3]

    run = tmp_path / "dist"
    if how == "to-dcp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert tool.main(["to-dcp", str(ckpt_file), str(run / "checkpoints" / "step_00000002")]) == 0
    else:
        shutil.copytree(ckpt_file.parent, run / "checkpoints" / "step_00000002")
    proc = _torchrun(_tp2(overrides, run), "--exit-after", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".staged")]
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [3], records
    loss = records[0]["loss"]
    assert math.isfinite(loss) and math.isclose(loss, ref_loss, rel_tol=1e-3), (loss, ref_loss)

    # the TP=2 job's own checkpoint (DTensor shards) passes the same verification, and to-single
    # of it loads into the single-process model
    step3 = run / "checkpoints" / "step_00000003"
    verify_dcp_metadata(step3)
    single = tmp_path / "step3.pt"
    assert tool.main(["to-single", str(step3), str(single)]) == 0
    ref_state = read_checkpoint(reference / "checkpoints" / "step_00000003")
    mine = torch.load(single, weights_only=True)
    assert mine["step"] == 3 and set(mine["model"]) == set(ref_state["model"])
    d = tmp_path / "as_single" / "step_00000003"
    d.mkdir(parents=True)
    torch.save({**mine, "config": ref_state["config"]}, d / "state.pt")
    model, _, step = load_trained_model(d)
    assert step == 3


def test_to_dcp_of_a_single_process_checkpoint_keeps_every_value(legacy_run, tmp_path, tool, tiny_cfg):
    """to-dcp then to-single of a ``state.pt`` of earlier versions gives back its model and,
    keyed by name, exactly the AdamW state of the trainer it was written from (torch's
    parameter ids mapped in the old optimizer's group order), which a live trainer resumed from
    the same file holds too."""
    from megatron_ufp4.training.trainer import Trainer

    src, overrides, truth = legacy_run
    ckpt = src / "checkpoints" / "step_00000002"
    out = tmp_path / "dcp" / "step_00000002"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tool.main(["to-dcp", str(ckpt / "state.pt"), str(out)]) == 0
        assert tool.main(["to-single", str(out), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert back["step"] == 2 and back["trainer"] == {"step": 2, "skipped_total": 0, "consecutive_nonfinite": 0}
    assert set(back["model"]) == set(state["model"])
    for k, v in state["model"].items():
        if isinstance(v, dict):
            assert all(torch.equal(back["model"][k][f], t) for f, t in v.items()), k
        else:
            assert torch.equal(back["model"][k], v), k
    assert_state_equal(back["model"], truth["model"], "model")
    assert set(back["optimizer"]) == set(truth["optimizer"])
    for fqn, st in truth["optimizer"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back["optimizer"][fqn][field], st[field]), (fqn, field)
        assert float(back["optimizer"][fqn]["step"]) == float(st["step"]) == 2.0
    assert verify_dcp_metadata(out) is not None

    run = tmp_path / "live"
    shutil.copytree(src / "checkpoints", run / "checkpoints")
    trainer = Trainer(tiny_cfg("tiny_dense", run, *[o for o in overrides if "run_dir" not in o]),
                      console=lambda *a: None)
    assert trainer.step == 2
    assert_state_equal(snapshot(trainer.model.state_dict()), truth["model"], "model")
    assert_state_equal(snapshot(trainer.optimizer.state_dict()), truth["optimizer"], "optimizer")
