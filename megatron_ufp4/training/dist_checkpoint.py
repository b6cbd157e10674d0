"""Sharded, reshardable checkpoints with torch.distributed.checkpoint (DCP).

The one checkpoint format of training, for every layout (one process included).  Every
rank writes only what it holds.  Keys are layout-independent: parameters keep their global
names (``layers.<global index>...``, ``mlp.experts.<global expert>...``) under any pipeline
or expert split, and tensor-parallel shards are saved as DTensors over the TP group
(``Shard(dim)`` of the parameter's ``Placement``; a whole tensor in one process), so DCP
can load them into any other TP size.  A fused parameter whose TP shard is not contiguous
in the full tensor (``Placement.parts`` s > 1, e.g. ``[gate; up]``) is saved as s separate keys
``<name>.part<j>``, each contiguous, whatever the TP size.  Replicated tensors
(data-parallel copies, SR generator states) are deduplicated by DCP.

Atomicity: ranks write into ``step_XXXXXXXX.tmp`` (each shard file fsynced); after a barrier
rank 0 writes and fsyncs the small files, renames the directory into place and fsyncs its
parent, so a crash mid-write never leaves a checkpoint under a final name.  A failed write
(disk full, read-only) raises ``CheckpointError`` on every rank with one line.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .checkpoint import (CheckpointError, undo_save, checkpoint_root, commit_checkpoint, config_differences,
                         describe_differences,
                         latest_checkpoint, prune_checkpoints)
from .errors import is_comm_failure
from ..outputs import fsync_dir, os_error_line, write_synced
from ..linear.expert_linear import per_expert_name
from ..model.expert_keys import stack_expert_optimizer, stack_experts, unstack_expert_optimizer
from ..model.placement import Placement, placement_of
from ..parallel.parallel_factory import shard_tensor

PART = ".part"


def _mesh(state, device_type: str):
    """The TP group as a one-dimensional DeviceMesh of the shards' device type (cuda under
    NCCL, cpu under gloo), made once per (state, device type)."""
    group = state.group("tp")
    if group is None:
        return None
    key = ("tp", device_type)
    if key not in state.meshes:
        state.meshes[key] = DeviceMesh.from_group(group, device_type=device_type)
    return state.meshes[key]


def _is_tp_sharded(placement: Placement | None) -> bool:
    # at every TP size (one process too), so the key layout (".part<j>") never depends on it
    return placement is not None and placement.split


def to_checkpoint_entries(name: str, local: torch.Tensor, placement: Placement | None, state) -> dict:
    """Local tensor → checkpoint entries (DTensor shards for TP-split tensors when there is
    a TP group; in one process the local tensor is the whole one).

    ``placement``: the parameter's (its optimizer moments are placed like it); None for a
    buffer.  Stacked routed experts give one entry (set) per expert, under its per-expert name.
    """
    if placement is not None and placement.experts is not None:
        out = {}
        for j, e in enumerate(placement.experts):
            out.update(to_checkpoint_entries(per_expert_name(name, e), local[j], placement.per_expert(), state))
        return out
    if not _is_tp_sharded(placement):
        return {name: local}
    dim, stride = placement.dim, placement.parts
    mesh = _mesh(state, local.device.type)

    def shard(t):
        return t if mesh is None else DTensor.from_local(t, mesh, [Shard(dim)], run_check=False)

    if stride == 1:
        return {name: shard(local)}
    return {f"{name}{PART}{j}": shard(p.contiguous()) for j, p in enumerate(local.chunk(stride, dim=dim))}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def from_checkpoint_entries(name: str, entries: dict, placement: Placement | None, state) -> torch.Tensor:
    if placement is not None and placement.experts is not None:
        return torch.stack([from_checkpoint_entries(per_expert_name(name, e), entries, placement.per_expert(), state)
                            for e in placement.experts])
    if not _is_tp_sharded(placement):
        return entries[name]
    stride = placement.parts
    if stride == 1:
        return _local(entries[name])
    if name in entries:  # saved whole (one-rank torchrun runs of older versions): this rank's slice of it
        return shard_tensor(entries[name], placement.dim, stride, state.tp, state.tp_rank)
    return torch.cat([_local(entries[f"{name}{PART}{j}"]) for j in range(stride)], dim=placement.dim)


def split_part_key(key: str) -> tuple[str, int | None]:
    """``"w.part1"`` -> ``("w", 1)``; a key that is no fused piece -> ``(key, None)``."""
    base, sep, j = key.rpartition(PART)
    return (base, int(j)) if sep and j.isdigit() else (key, None)


def whole_fused_entries(entries: dict, saved_sizes: dict) -> dict:
    """Load templates for a checkpoint that saved a fused parameter under its own name instead
    of ``.part<j>`` pieces (one-rank torchrun runs of older versions): the whole tensor, which
    ``from_checkpoint_entries`` slices.  ``saved_sizes``: key -> size, from the metadata."""
    out = {}
    for k, v in entries.items():
        base, j = split_part_key(k)
        if j is not None and k not in saved_sizes and base in saved_sizes:
            out[base] = torch.empty(tuple(saved_sizes[base]), dtype=v.dtype, device=_local(v).device)
        else:
            out[k] = v
    return out


def _placement(root: nn.Module, name: str) -> Placement | None:
    """The placement of the parameter a state-dict key names (None: a buffer).  By module and
    attribute, so a tied weight's second name (``head.weight``) finds its own module's record."""
    prefix, _, attr = name.rpartition(".")
    module = root.get_submodule(prefix) if prefix else root
    return placement_of(module, attr) if attr in module._parameters else None


def extra_state_entries(name: str, value: dict) -> dict:
    """``{key: tensor}`` of a linear's extra state: ``<name>.<field>``, or per expert
    (``{expert: state}`` of stacked experts) under each expert's own name."""
    if value and all(isinstance(e, int) for e in value):
        return {f"{per_expert_name(name, e)}.{k}": v for e, st in value.items() for k, v in st.items()}
    return {f"{name}.{k}": v for k, v in value.items()}


def _extra_state_from(name: str, owner: dict, entries: dict) -> dict:
    if owner and all(isinstance(e, int) for e in owner):
        return {e: {k: entries[f"{per_expert_name(name, e)}.{k}"] for k in st} for e, st in owner.items()}
    return {k: entries[f"{name}.{k}"] for k in owner}


def model_entries(modules: list[nn.Module], state) -> tuple[dict, dict]:
    """(checkpoint entries, name → placement (or extra-state dict) for restoring) over this rank's modules."""
    entries, owners = {}, {}
    for module in modules:
        for name, value in module.state_dict(keep_vars=True).items():
            if isinstance(value, dict):  # a linear's extra state: SR generator + RHT signs
                entries.update(extra_state_entries(name, value))
                owners[name] = value
                continue
            placement = _placement(module, name)
            entries.update(to_checkpoint_entries(name, value.detach(), placement, state))
            owners[name] = placement
    return entries, owners


def _first_failure(e: BaseException) -> BaseException:
    """The underlying error of the lowest failing rank of a DCP ``CheckpointException`` (else ``e``)."""
    failures = getattr(e, "failures", None) or {}  # rank -> exception (or (exception, traceback))
    if not failures:
        return e
    cause = failures[min(failures)]
    return cause[0] if isinstance(cause, tuple) else cause


def _save_error_line(e: BaseException, step: int, tmp: Path, previous) -> str:
    """One line for a failed sharded save, from the first rank's underlying error."""
    cause = _first_failure(e)
    what = os_error_line(cause, str(tmp)) if isinstance(cause, OSError) else \
        (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return f"cannot save checkpoint step {step}: {what}; {kept}"


def _agree(state, error: str | None) -> None:
    """Every rank raises rank 0's error line (or none): the job's one line keeps the reason."""
    box = [error]
    if state.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])


class _KeepWriteErrors:
    """A DCP output stream that remembers a failed write's ``OSError``."""

    def __init__(self, stream, errors: list):
        self._stream, self._errors = stream, errors

    def write(self, data):
        try:
            return self._stream.write(data)
        except OSError as e:
            self._errors.append(e)
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _ErrnoKeepingFileSystem(FileSystem):
    """DCP's file system whose shard files report a failed write as its ``OSError`` (errno and
    file): torch.save's zip writer swallows the exception of a Python ``write`` and raises
    "unexpected pos" instead (cf. ``outputs.SyncedWriter``)."""

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        errors: list = []
        with super().create_stream(path, mode) as stream:
            try:
                yield _KeepWriteErrors(stream, errors)
            except Exception:
                if errors:
                    raise OSError(errors[0].errno, errors[0].strerror, str(path)) from None
                raise


def save_distributed(run_dir: str | Path, step: int, entries: dict, state, config_yaml: str, keep_last: int,
                     extra_files: dict[str, str] | None = None, _before_rename=None) -> Path:
    """Write ``entries`` as checkpoint ``step`` (collective) and prune to ``keep_last``.
    ``_before_rename(tmp)``: a test hook, a crash just before the commit point."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp, old = root / f"{final.name}.tmp", root / f"{final.name}.old"
    previous = latest_checkpoint(run_dir)
    error = None
    if state.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _save_error_line(e, step, tmp, previous)
    _agree(state, error)
    try:
        writer = FileSystemWriter(tmp)  # fsyncs each shard file
        writer.fs = _ErrnoKeepingFileSystem()
        with warnings.catch_warnings():  # one process without a process group is DCP's no_dist case: no warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.save(entries, storage_writer=writer, no_dist=not (dist.is_available() and dist.is_initialized()))
    except (Exception, CheckpointException) as e:  # raised on every rank alike, with each rank's failure collected
        if is_comm_failure(_first_failure(e)):
            raise  # a hung or dead peer, not a storage problem: the trainer reports it as such
        if state.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_error_line(e, step, tmp, previous)) from None
    if state.world_size > 1:
        dist.barrier()
    if state.rank == 0:
        try:
            write_synced(tmp / "config.yaml", config_yaml)
            for name, text in (extra_files or {}).items():
                write_synced(tmp / name, text)
            fsync_dir(tmp)
            if _before_rename is not None:
                _before_rename(tmp)
            commit_checkpoint(tmp, final, old)
            prune_checkpoints(run_dir, keep_last, keep=final)
        except OSError as e:
            undo_save(tmp, old, final)
            error = _save_error_line(e, step, tmp, previous)
        except BaseException:
            undo_save(tmp, old, final)
            raise
    _agree(state, error)
    return final


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def restore_model(modules: list[nn.Module], entries: dict, owners: dict, state) -> None:
    """Copy loaded ``entries`` (keys as ``model_entries`` made them) into the modules."""
    for module in modules:
        sd = {}
        for name in module.state_dict(keep_vars=True):
            owner = owners[name]
            if isinstance(owner, dict):
                sd[name] = _extra_state_from(name, owner, entries)
            else:
                sd[name] = from_checkpoint_entries(name, entries, owner, state)
        module.load_state_dict(sd)


def load_sharded(entries: dict, path: str | Path) -> None:
    """Fill ``entries`` from the DCP checkpoint ``path`` (resharding as needed), safely: the
    ``.metadata`` is verified by a restricted unpickler first and DCP loads exactly that
    object; pickled (non-tensor) entries are refused.  Failures: one ``CheckpointError`` line
    naming the file, the same on every rank (see ``safe_load``)."""
    from .safe_load import load_dcp

    load_dcp(entries, path)


# -- the trainer's state: model, ZeRO-1 optimizer shards, counters --------------------------
COUNTERS = ("step", "skipped_total", "consecutive_nonfinite")


def partitions_of(placements: dict) -> dict:
    """Split dim and fused-part stride of every tensor-parallel parameter and its AdamW moments
    (``partitions.json``: how the ``.part<j>`` pieces of a fused parameter join)."""
    out = {"model": {}, "optim": {}}
    for n, p in placements.items():
        if p.experts is not None:  # per expert, as checkpoints key them
            each = partitions_of({per_expert_name(n, e): p.per_expert() for e in p.experts})
            out["model"].update(each["model"])
            out["optim"].update(each["optim"])
            continue
        if p.split:
            info = {"dim": p.dim, "stride": p.parts}
            out["model"][n] = info
            out["optim"].update({f"{n}.exp_avg": info, f"{n}.exp_avg_sq": info})
    return out


def _gathered_partitions(optimizer, state) -> dict:
    """``partitions_of`` merged over every rank (collective)."""
    if state.world_size == 1:
        return partitions_of(optimizer.placements)
    gathered = [None] * state.world_size
    dist.all_gather_object(gathered, partitions_of(optimizer.placements))
    merged = {"model": {}, "optim": {}}
    for g in gathered:
        for k in merged:
            merged[k].update(g[k])
    return merged


def trainer_entries(stages, optimizer, state, counters: dict, templates: bool = False) -> tuple[dict, dict]:
    """Everything the trainer checkpoints, as DCP entries: ``model.*`` (this rank's
    modules), ``optim.*`` (the AdamW moments this rank owns; ``templates``: empty ones of this
    layout, for a load to fill) and ``trainer.*`` counters.  Returns (entries, model owners)."""
    model, owners = model_entries(stages, state)
    entries = {f"model.{k}": v for k, v in model.items()}
    states = optimizer.state_dict()  # under checkpoint fqns: stacked experts one by one
    if templates:
        states = unstack_expert_optimizer({n: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                                               "step": torch.zeros(())} for n, p in optimizer.owned},
                                          optimizer.placements)
    where = optimizer.checkpoint_placements()
    for fqn, sd in states.items():
        for field in ("exp_avg", "exp_avg_sq"):
            entries.update({f"optim.{k}": v for k, v in
                            to_checkpoint_entries(f"{fqn}.{field}", sd[field], where[fqn], state).items()})
        entries[f"optim.{fqn}.step"] = sd["step"]
    entries.update({f"trainer.{k}": torch.tensor(counters[k]) for k in COUNTERS})
    return entries, owners


def save_trainer(run_dir, stages, optimizer, state, counters: dict, config: dict, config_yaml: str,
                 keep_last: int, _before_rename=None) -> Path:
    """A sharded checkpoint of the trainer at ``counters["step"]`` (collective)."""
    entries, _ = trainer_entries(stages, optimizer, state, counters)
    partitions = _gathered_partitions(optimizer, state)
    return save_distributed(run_dir, counters["step"], entries, state, config_yaml, keep_last,
                            extra_files={"partitions.json": json.dumps({**partitions, "config": config})},
                            _before_rename=_before_rename)


def load_trainer(path: Path, stages, optimizer, state, config: dict, shown_as: Path | None = None) -> dict:
    """Load a sharded checkpoint (any layout) into this rank's modules and optimizer shard;
    returns the counters.  An incompatible config is one ``CheckpointError`` line naming
    ``shown_as`` (the checkpoint the user gave, when ``path`` is a converted copy of it)."""
    from .safe_load import read_partitions, verify_dcp_metadata

    diffs = config_differences(read_partitions(path).get("config", {}), config)
    if diffs:
        raise CheckpointError(f"checkpoint {shown_as or path} is from an incompatible config: "
                              f"{describe_differences(diffs)}")
    entries, owners = trainer_entries(stages, optimizer, state, dict.fromkeys(COUNTERS, 0), templates=True)
    saved = {k: v.size for k, v in verify_dcp_metadata(path).state_dict_metadata.items() if hasattr(v, "size")}
    entries = whole_fused_entries(entries, saved)
    load_sharded(entries, path)  # verified, no unpickling of code; fills this layout's entries, resharding
    restore_model(stages, {k[len("model."):]: v for k, v in entries.items() if k.startswith("model.")}, owners, state)
    states = {}
    for fqn, placement in optimizer.checkpoint_placements().items():
        sd = {}
        for field in ("exp_avg", "exp_avg_sq"):
            sub = {k[len("optim."):]: v for k, v in entries.items() if k.startswith(f"optim.{fqn}.{field}")}
            sd[field] = from_checkpoint_entries(f"{fqn}.{field}", sub, placement, state)
        sd["step"] = entries[f"optim.{fqn}.step"]
        states[fqn] = sd
    optimizer.load_state_dict(states)
    return {k: int(entries[f"trainer.{k}"]) for k in COUNTERS}


# -- one process, the whole checkpoint ----------------------------------------------------------------
def merge_parts(flat: dict, partitions: dict) -> dict:
    """Join the ``<name>.part<j>`` pieces of fused parameters back along their split dim."""
    out, parts = {}, {}
    for k, v in flat.items():
        base, j = split_part_key(k)
        if j is not None and base in partitions:
            parts.setdefault(base, {})[j] = v
        else:
            out[k] = v
    for base, pieces in parts.items():
        out[base] = torch.cat([pieces[j] for j in sorted(pieces)], dim=partitions[base]["dim"])
    return out


def nest_extra_state(model_flat: dict) -> dict:
    """``x._extra_state.sr_generator`` → ``x._extra_state = {"sr_generator": ...}``."""
    out = {}
    for k, v in model_flat.items():
        head, sep, field = k.partition("._extra_state.")
        if sep:
            out.setdefault(f"{head}._extra_state", {})[field] = v
        else:
            out[k] = v
    return out


def load_consolidated(path: str | Path) -> dict:
    """A sharded checkpoint read whole in one process (no torchrun), safely: ``{"model":
    <single-process GPTModel state dict>, "optimizer": {fqn: {exp_avg, exp_avg_sq, step}},
    "step", "trainer", "config", "partitions"}``, TP shards and fused parts joined."""
    from .safe_load import load_dcp_full, read_partitions

    meta = read_partitions(path)  # which .part<j> pieces to join along which dim, and the config
    flat = load_dcp_full(path)  # .metadata verified by a restricted unpickler; tensors only
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    optim = {k[len("optim."):]: v for k, v in flat.items() if k.startswith("optim.")}
    model = stack_experts(nest_extra_state(merge_parts(model, meta.get("model", {}))))
    optimizer: dict = {}
    for k, v in merge_parts(optim, meta.get("optim", {})).items():
        fqn, _, field = k.rpartition(".")
        optimizer.setdefault(fqn, {})[field] = v
    # stacks as the model's (an expert without saved state: AdamW's fresh one)
    optimizer = stack_expert_optimizer(optimizer, {k: tuple(v.shape) for k, v in model.items() if torch.is_tensor(v)})
    trainer = {k[len("trainer."):]: int(v) for k, v in flat.items() if k.startswith("trainer.")}
    return {"model": model, "optimizer": optimizer, "step": trainer.get("step", 0), "trainer": trainer,
            "config": meta.get("config", {}),
            "partitions": {"model": meta.get("model", {}), "optim": meta.get("optim", {})}}
