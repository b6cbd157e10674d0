"""Every checkpoint form this project reads, turned into the two things its users need.

Forms: a sharded (DCP) directory -- what training writes, on every layout; a single file
-- ``state.pt`` of the single-process trainer of older versions (torch AdamW state keyed by
parameter index), a ``tools/convert_checkpoint.py to-single`` file (AdamW state keyed by
parameter name), an HF import (weights only) -- or a ``step_*`` directory holding one.

* ``read_checkpoint(path)``: the whole checkpoint in one process, ``{"model": <state dict of
  the one-process model>, "optimizer": {fqn: {exp_avg, exp_avg_sq, step}} (or None), "step",
  "trainer": counters, "config"}`` -- for evaluation, sampling, probes, HF export, the tools.
* ``as_sharded_checkpoint(path, run_dir)``: a single file written once as a temporary sharded
  directory (``write_sharded``), so the trainer resumes or initialises from it on any layout
  through the one sharded loader.  A sharded directory is used as it is.

Nothing in a file is executed (``safe_load``); a bad one is one ``CheckpointError`` line.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import config_from_saved, dump_config
from ..model.expert_keys import (per_expert_shapes, per_expert_views, stack_expert_optimizer, stack_experts,
                                 unstack_expert_optimizer, unstack_experts)
from ..model.placement import named_placements
from .checkpoint import CheckpointError, checkpoint_root
from .dist_checkpoint import (COUNTERS, PART, is_distributed_checkpoint, load_consolidated, load_sharded,
                              model_entries, partitions_of, restore_model, split_part_key)

STATE_FILE = "state.pt"


def state_file_of(path: str | Path) -> Path | None:
    """The single file of ``path`` (a file, or a directory holding ``state.pt``), else None."""
    p = Path(path)
    if p.is_file():
        return p
    return p / STATE_FILE if (p / STATE_FILE).is_file() else None


def _meta_model(cfg):
    from ..parallel.build import build_model

    return build_model(cfg, device="meta")[0]


def _optimizer_by_name(data: dict, cfg, model, src: Path) -> dict | None:
    """The optimizer state of a single file as ``{fqn: {exp_avg, exp_avg_sq, step}}``.  The
    single-process trainer of older versions saved torch AdamW's own state dict, whose
    parameters are numbered in its groups' order (matrices decayed first, then 1-D
    parameters, each in ``named_parameters()`` order)."""
    opt = data.get("optimizer") if "optimizer" in data else None
    if opt is None:
        return None  # weights only
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if "param_groups" not in opt:  # by name (a to-single file; per expert from earlier versions)
        return _stacked(opt, shapes, src)
    # numbered, matrices decayed first: earlier versions' parameters (each routed expert its
    # own) or the model's; the group sizes tell them apart, and the saved shapes where they do
    # not (one expert per layer)
    saved, state = opt["param_groups"], opt.get("state", {})
    sizes = [len(g.get("params", [])) for g in saved] if isinstance(saved, list) else None
    placements = named_placements(model)
    layouts = ([(n, tuple(v.shape), v.dim() >= 2) for n, v in per_expert_views(model.named_parameters(), placements)],
               [(n, tuple(p.shape), placements[n].matrix) for n, p in model.named_parameters()])
    for named in layouts:
        groups = [[(n, s) for n, s, m in named if m], [(n, s) for n, s, m in named if not m]]
        if sizes == [len(g) for g in groups] and all(
                tuple(state[pid]["exp_avg"].shape) == shape for g_saved, g in zip(saved, groups)
                for pid, (_, shape) in zip(g_saved["params"], g) if isinstance(state.get(pid), dict)
                and torch.is_tensor(state[pid].get("exp_avg"))):
            break
    else:
        raise CheckpointError(f"{src}: its optimizer's parameter groups do not match the model of its config")
    out = {}
    for g_saved, g in zip(saved, groups):
        for pid, (fqn, shape) in zip(g_saved["params"], g):
            st = state.get(pid)
            if st is None:  # never stepped (e.g. an expert that got no tokens): AdamW's fresh state, exactly
                st = {"exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape), "step": torch.zeros(())}
            if tuple(st["exp_avg"].shape) != shape or tuple(st["exp_avg_sq"].shape) != shape:
                raise CheckpointError(f"{src}: optimizer state of {fqn} has shape {tuple(st['exp_avg'].shape)}, "
                                      f"the parameter {shape}")
            out[fqn] = {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"],
                        "step": torch.as_tensor(st["step"]).detach().float().reshape(())}
    return _stacked(out, shapes, src)


def _stacked(states: dict, shapes: dict, src) -> dict:
    try:
        return stack_expert_optimizer(states, shapes)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None


def _weight_keys(keys) -> set:
    return {k for k in keys if not k.endswith("_extra_state")}


def read_single_file(f: Path, require=("model", "config", "step"), resume: bool = False) -> dict:
    """A single-file checkpoint in the ``read_checkpoint`` form.  ``resume``: it must be a
    whole training state (optimizer and counters), never completed with defaults; a missing
    key is one line naming it and the file."""
    from .safe_load import load_state_file

    data = load_state_file(f, require=require)
    if resume:
        for key in ("optimizer", *(("trainer",) if "trainer" in data else ("skipped_total", "consecutive_nonfinite"))):
            data[key]  # noqa: B018 -- raises "checkpoint F lacks 'key'"
    cfg = config_from_saved(data["config"])
    model = _meta_model(cfg)
    try:
        weights = stack_experts(data["model"])  # per-expert keys (earlier versions) -> the model's stacked experts
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None
    want, have = _weight_keys(model.state_dict()), _weight_keys(weights)  # weights-only files (HF import) too
    if have != want:
        extra, missing = sorted(have - want), sorted(want - have)
        raise CheckpointError(f"{f}: its model does not match its config ("
                              + (f"lacks {missing[0]!r}" if missing else f"has an unexpected {extra[0]!r}") + ")")
    trainer = data.get("trainer") or {"step": int(data["step"]),
                                      "skipped_total": int(data.get("skipped_total", 0)),
                                      "consecutive_nonfinite": int(data.get("consecutive_nonfinite", 0))}
    return {"model": weights, "optimizer": _optimizer_by_name(data, cfg, model, f), "step": int(data["step"]),
            "trainer": trainer, "config": data["config"]}


def _locate(path: str | Path, missing: str) -> tuple[Path, bool]:
    """(the checkpoint, whether it is sharded): a sharded directory, else the single file of
    ``path``; ``missing``: the error line when it is neither."""
    p = Path(path)
    if p.is_dir() and is_distributed_checkpoint(p):
        return p, True
    f = state_file_of(p)
    if f is None:
        raise CheckpointError(missing)
    return f, False


def read_checkpoint(path: str | Path) -> dict:
    """Any checkpoint (a ``step_*`` directory of either format, or a single file), whole."""
    found, sharded = _locate(path, f"no checkpoint at {path}")
    return load_consolidated(found) if sharded else read_single_file(found)


def write_sharded(state: dict, dst: Path, model=None) -> None:
    """``state`` (the ``read_checkpoint`` form) as a sharded checkpoint directory ``dst``
    (written in one process, loadable by any layout).  ``model``: the one-process model of
    its config (its fused-parameter partitions), built on the meta device when not given."""
    import torch.distributed.checkpoint as dcp

    cfg = config_from_saved(state["config"])
    placements = named_placements(model or _meta_model(cfg))
    partitions = partitions_of(placements)
    flat: dict = {f"trainer.{k}": torch.tensor(int(state["trainer"].get(k, 0))) for k in COUNTERS}
    for k, v in unstack_experts(state["model"], placements).items():  # checkpoints key experts one by one
        if isinstance(v, dict):
            flat.update({f"model.{k}.{f}": t for f, t in v.items()})
        else:
            flat[f"model.{k}"] = v
    for fqn, st in unstack_expert_optimizer(state.get("optimizer") or {}, placements).items():
        flat.update({f"optim.{fqn}.{f}": t for f, t in st.items()})
    split = {f"model.{k}": i for k, i in partitions["model"].items()} | \
        {f"optim.{k}": i for k, i in partitions["optim"].items()}
    out = {}
    for k, v in flat.items():
        info = split.get(k)
        if info and info["stride"] > 1:
            for j, piece in enumerate(v.chunk(info["stride"], dim=info["dim"])):
                out[f"{k}{PART}{j}"] = piece.clone()
        else:
            out[k] = v
    with warnings.catch_warnings():  # "no process group: saving from one process" is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(out, checkpoint_id=str(dst), no_dist=True)
    (dst / "partitions.json").write_text(json.dumps({**partitions, "config": state["config"]}))
    (dst / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")


@dataclass
class Staged:
    """A sharded checkpoint to load from; ``remove()`` deletes it when it is a temporary copy."""
    path: Path
    temporary: bool = False

    def remove(self) -> None:
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


def as_sharded_checkpoint(path: str | Path, run_dir: str | Path, field: str) -> Staged:
    """``path`` as a sharded checkpoint: itself, or a single file converted into a temporary
    directory under ``run_dir/checkpoints`` (``.staged-<pid>``, removed by the caller; a
    leftover of a killed run is cleaned at the next start).  ``field`` names the setting the
    path came from in errors."""
    found, sharded = _locate(path, f"{field} {path}: no checkpoint there (a step_* directory or a state.pt file)")
    if sharded:
        return Staged(found)
    state = read_single_file(found, resume=field == "training.resume")
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f".staged-{os.getpid()}"
    shutil.rmtree(dst, ignore_errors=True)
    try:
        write_sharded(state, dst)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return Staged(dst, temporary=True)


def _whole_shapes(path: Path, sizes: dict) -> dict:
    """``{parameter: whole shape}`` of a sharded checkpoint's model weights from its entries'
    ``sizes`` (``.part<j>`` pieces joined along the dim ``partitions.json`` records)."""
    from .safe_load import read_partitions

    dims = {n: info["dim"] for n, info in read_partitions(path).get("model", {}).items()}
    whole: dict = {}
    for key, size in sizes.items():
        if "._extra_state" in key:
            continue
        name = split_part_key(key)[0]
        if name != key and name in whole:  # a further piece of a fused parameter
            whole[name][dims[name]] += size[dims[name]]
        else:
            whole[name] = list(size)
    return {k: tuple(v) for k, v in whole.items()}


def load_weights_into(modules, path: Path, state, cfg, field: str, shown_as: Path | None = None) -> None:
    """``training.init_from``: the model weights of the sharded checkpoint ``path`` into this
    rank's ``modules`` (any layout), keeping their own SR generators and RHT signs.  The
    checkpoint must hold exactly the weights of ``cfg``'s model, shape for shape; else one
    ``CheckpointError`` line naming the key and ``shown_as`` (the path the user gave, when
    ``path`` is a converted copy of it)."""
    from .dist_checkpoint import whole_fused_entries

    from .safe_load import verify_dcp_metadata

    shown = shown_as or path
    sizes = {k[len("model."):]: tuple(v.size) for k, v in verify_dcp_metadata(path).state_dict_metadata.items()
             if k.startswith("model.")}  # the metadata, read and verified once
    saved = _whole_shapes(path, sizes)
    meta = _meta_model(cfg)
    want = per_expert_shapes(meta, named_placements(meta))  # as checkpoints key them: experts one by one
    for k in want:  # in the model's order: the first parameter that differs is named
        if k not in saved:
            raise CheckpointError(f"{field} {shown} lacks {k!r}, which the model has")
        if saved[k] != want[k]:
            raise CheckpointError(f"{field} {shown}: {k} has shape {saved[k]}, the model {want[k]}")
    for k in sorted(set(saved) - set(want)):
        raise CheckpointError(f"{field} {shown} has {k!r}, which the model lacks")
    entries, owners = model_entries(modules, state)
    weights = whole_fused_entries({k: v for k, v in entries.items() if "._extra_state." not in k}, sizes)
    load_sharded({f"model.{k}": v for k, v in weights.items()}, path)
    restore_model(modules, {**entries, **weights}, owners, state)
