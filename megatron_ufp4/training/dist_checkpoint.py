"""Sharded, reshardable checkpoints with torch.distributed.checkpoint (DCP).

Every rank writes only what it holds.  Keys are layout-independent: parameters keep their
global names (``layers.<global index>...``, ``mlp.experts.<global expert>...``) under any
pipeline or expert split, and tensor-parallel shards are saved as DTensors over the TP
group (``Shard(partition_dim)``), so DCP can load them into any other TP size.  A fused
parameter whose TP shard is not contiguous in the full tensor (``partition_stride`` s > 1,
e.g. ``[gate; up]``) is saved as s separate keys ``<name>.part<j>``, each contiguous.
Replicated tensors (data-parallel copies, SR generator states) are deduplicated by DCP.

Atomicity: ranks write into ``step_XXXXXXXX.tmp`` (each shard file fsynced); after a barrier
rank 0 writes and fsyncs the small files, renames the directory into place and fsyncs its
parent, so a crash mid-write never leaves a checkpoint under a final name.  A failed write
(disk full, read-only) raises ``CheckpointError`` on every rank with one line.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .checkpoint import CheckpointError, checkpoint_root, latest_checkpoint, prune_checkpoints
from .errors import is_comm_failure
from .fsutil import fsync_dir, os_error_line, write_synced

PART = ".part"


def _mesh(state):
    if not hasattr(state, "_tp_mesh"):
        group = state.group("tp")
        state._tp_mesh = DeviceMesh.from_group(group, device_type="cpu") if group is not None else None
    return state._tp_mesh


def _is_tp_sharded(t: torch.Tensor, state) -> bool:
    # also at TP=1 (a one-rank mesh), so the key layout (".part<j>") never depends on TP size
    return bool(getattr(t, "tensor_parallel", False)) and state.group("tp") is not None


def to_checkpoint_entries(name: str, local: torch.Tensor, like: torch.Tensor, state) -> dict:
    """Local tensor → checkpoint entries (DTensor shards for TP-partitioned tensors).

    ``like`` carries the partition attributes (the parameter itself; optimizer moments
    of a parameter are partitioned like it).
    """
    if not _is_tp_sharded(like, state):
        return {name: local}
    dim, stride = like.partition_dim, getattr(like, "partition_stride", 1)
    mesh = _mesh(state)
    parts = local.chunk(stride, dim=dim)
    if stride == 1:
        return {name: DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)}
    return {f"{name}{PART}{j}": DTensor.from_local(p.contiguous(), mesh, [Shard(dim)], run_check=False)
            for j, p in enumerate(parts)}


def from_checkpoint_entries(name: str, entries: dict, like: torch.Tensor, state) -> torch.Tensor:
    if not _is_tp_sharded(like, state):
        return entries[name]
    stride = getattr(like, "partition_stride", 1)
    if stride == 1:
        return entries[name].to_local()
    return torch.cat([entries[f"{name}{PART}{j}"].to_local() for j in range(stride)], dim=like.partition_dim)


def model_entries(modules: list[nn.Module], state) -> tuple[dict, dict]:
    """(checkpoint entries, name → parameter/buffer for restoring) over this rank's modules."""
    entries, owners = {}, {}
    for module in modules:
        named = dict(module.named_parameters())
        for name, value in module.state_dict(keep_vars=True).items():
            like = named.get(name, value)
            if isinstance(value, dict):  # QuantizedLinear extra state: SR generator + RHT signs
                for k, v in value.items():
                    entries[f"{name}.{k}"] = v
                owners[name] = value
                continue
            entries.update(to_checkpoint_entries(name, value.detach(), like, state))
            owners[name] = like
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
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])


def save_distributed(run_dir: str | Path, step: int, entries: dict, state, config_yaml: str, keep_last: int,
                     extra_files: dict[str, str] | None = None) -> Path:
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
        dcp.save(entries, checkpoint_id=str(tmp))  # FileSystemWriter fsyncs each shard file
    except Exception as e:  # raised on every rank alike, with each rank's failure collected
        if is_comm_failure(_first_failure(e)):
            raise  # a hung or dead peer, not a storage problem: the trainer reports it as such
        if state.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_error_line(e, step, tmp, previous)) from None
    dist.barrier()
    if state.rank == 0:
        try:
            write_synced(tmp / "config.yaml", config_yaml)
            for name, text in (extra_files or {}).items():
                write_synced(tmp / name, text)
            fsync_dir(tmp)
            if final.exists():
                final.rename(old)
            tmp.rename(final)  # the commit point
            fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
            prune_checkpoints(run_dir, keep_last, keep=final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not final.exists():
                old.rename(final)
            error = _save_error_line(e, step, tmp, previous)
    _agree(state, error)
    return final


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def restore_model(modules: list[nn.Module], entries: dict, owners: dict, state) -> None:
    """Copy loaded ``entries`` (keys as ``model_entries`` made them) into the modules."""
    for module in modules:
        sd = {}
        for name in module.state_dict(keep_vars=True):
            like = owners[name]
            if isinstance(like, dict):
                sd[name] = {k: entries[f"{name}.{k}"] for k in like}
            else:
                sd[name] = from_checkpoint_entries(name, entries, like, state)
        module.load_state_dict(sd)


def load_sharded(entries: dict, path: str | Path) -> None:
    """Fill ``entries`` from the DCP checkpoint ``path`` (resharding as needed), safely: the
    ``.metadata`` is verified by a restricted unpickler first and DCP loads exactly that
    object; pickled (non-tensor) entries are refused.  Failures: one ``CheckpointError`` line
    naming the file, the same on every rank (see ``safe_load``)."""
    from .safe_load import load_dcp

    load_dcp(entries, path)
