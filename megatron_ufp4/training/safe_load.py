"""Loading checkpoints without executing anything they contain, with one-line errors.

A checkpoint is data; loading one must never run code.  Three readers cover every file
this project loads:

* ``state.pt`` (the single-process trainer of earlier versions, ``to-single`` output, HF import):
  ``torch.load(weights_only=True)``
  (``load_state_file``); a refused global is named in the error.
* a sharded (DCP) checkpoint's ``.metadata``: torch's ``FileSystemReader`` unpickles it
  without restriction, so ``verify_dcp_metadata`` reads it with ``RestrictedUnpickler``,
  which admits only ``ALLOWED_GLOBALS`` (what torch's DCP writer puts there), then checks
  its structure against the data files.  ``SafeFileSystemReader`` hands DCP exactly the
  object that was verified, so nothing re-reads the file between the check and the load.
* the DCP data files (``__<rank>_<n>.distcp``): tensors are read by DCP with
  ``torch.load(weights_only=True)``; non-tensor ("bytes") entries would be read with
  ``torch.load(weights_only=False)`` by DCP's planners, so they are refused (this project
  only ever saves tensors there): in the metadata check and again in ``read_data``.

Every failure is a ``CheckpointError`` (a ``ValueError``) with one line naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import pickle
import re
import warnings
from pathlib import Path

import torch

from .checkpoint import CheckpointError

_DCP_META = "torch.distributed.checkpoint.metadata"
# What torch.distributed.checkpoint (2.x) writes into .metadata, listed by recording every
# global the unpickler resolves on real checkpoints of this project (TP / PP / DP / EP
# layouts, the single-process to-dcp conversion) and on dcp.save of every tensor dtype:
ALLOWED_GLOBALS = {
    (_DCP_META, "Metadata"),                 # the root object
    (_DCP_META, "TensorStorageMetadata"),    # per tensor entry: properties, size, chunks
    (_DCP_META, "BytesStorageMetadata"),     # per non-tensor entry (admitted here, refused by the structure check)
    (_DCP_META, "ChunkStorageMetadata"),     # offsets / sizes of one saved chunk
    (_DCP_META, "TensorProperties"),         # dtype, layout, memory format of an entry
    (_DCP_META, "_MEM_FORMAT_ENCODING"),     # enum inside TensorProperties' pickled state
    (_DCP_META, "MetadataIndex"),            # key of storage_data: (fqn, chunk offset)
    (_DCP_META, "StorageMeta"),              # checkpoint id, save id
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # file, byte offset, length of a chunk
    ("torch", "Size"),                       # sizes and offsets
    ("torch.serialization", "_get_layout"),  # how torch pickles torch.strided: a lookup by name
    ("pathlib", "PosixPath"),                # StorageMeta.checkpoint_id (the save directory)
    ("pathlib", "WindowsPath"),              # ... when written on Windows (read as a PureWindowsPath)
    ("pathlib._local", "PosixPath"),         # the same classes' module on Python >= 3.13
    ("pathlib._local", "WindowsPath"),
}
# plus ("torch", <name>) for every torch.dtype (torch.float32, torch.bfloat16, ...): entry dtypes.
_SUBSTITUTES = {"WindowsPath": pathlib.PureWindowsPath}  # a WindowsPath cannot be instantiated on POSIX


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def describe_load_error(e: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)`` (torch's message is a page)."""
    if isinstance(e, pickle.UnpicklingError):
        text = str(e)
        m = _GLOBAL.search(text)
        if m:
            name = m.group(1).rstrip(".")
            name = name if "." in name else f"builtins.{name}"  # torch writes "GLOBAL exec" for builtins
            return f"it references {name}, which a checkpoint never contains"
        details = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation", "\t(", "(1)", "(2)"))]
        return f"damaged or not a torch checkpoint ({details[0] if details else 'unpickling failed'})"
    return _first_line(e)


def load_torch_file(f: str | Path):
    """``torch.load(f, weights_only=True)`` on CPU; any failure is one ``CheckpointError`` line."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says what matters
            warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        what = describe_load_error(e)
        verb = "refusing to load" if what.startswith("it references") else "cannot read checkpoint"
        raise CheckpointError(f"{verb} {f}: {what}") from None


class CheckpointState(dict):
    """A loaded state dict whose missing keys raise ``CheckpointError`` naming the file.

    ``strict`` keys (those every training checkpoint has) raise even through ``.get``: a
    caller's default must not turn a damaged file into a misleading error further on.
    """

    def __init__(self, data: dict, source: str | Path, prefix: str = "", strict=()):
        super().__init__(data)
        self.source, self.prefix, self.strict = str(source), prefix, tuple(strict)

    def __missing__(self, key):
        raise CheckpointError(f"checkpoint {self.source} lacks {self.prefix + str(key)!r}")

    def get(self, key, default=None):
        return self[key] if key in self.strict else super().get(key, default)


TRAINING_KEYS = ("model", "config", "step")  # what eval / sample / resume all read


def checked_state(state, source: str | Path, require=(), strict=TRAINING_KEYS) -> CheckpointState:
    """``state`` as a ``CheckpointState``: a dict, with every ``require`` key now, and the
    ``strict`` keys whenever read (also through ``.get``).  Keys needed only for resuming
    (``optimizer``, ``rng``, ...) raise when read."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source} does not hold a training state (it holds a "
                              f"{type(state).__name__})")
    out = CheckpointState(state, source, strict=strict)
    for key in require:
        out[key]  # noqa: B018 -- raises naming the key
    for key in ("model", "config", "optimizer"):
        if key in out and not isinstance(out[key], dict):
            raise CheckpointError(f"checkpoint {source}: {key!r} is a {type(out[key]).__name__}, not a dict")
    if isinstance(out.get("rng"), dict):
        out["rng"] = CheckpointState(out["rng"], source, "rng.")
    return out


def load_state_file(f: str | Path, require=(), strict=TRAINING_KEYS) -> CheckpointState:
    """A single-file state dict (``state.pt``), loaded safely and checked (see ``checked_state``)."""
    return checked_state(load_torch_file(f), f, require, strict)


# -- sharded (DCP) checkpoints ------------------------------------------------------------------
class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``ALLOWED_GLOBALS`` and torch dtypes; anything else raises ``RefusedGlobal``."""

    def find_class(self, module, name):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in ALLOWED_GLOBALS:
            if name in _SUBSTITUTES:
                return _SUBSTITUTES[name]
            return super().find_class(module, name)
        raise RefusedGlobal(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of checkpoint metadata")


def _dcp_types():
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                       TensorStorageMetadata)
    return Metadata, TensorStorageMetadata, BytesStorageMetadata, MetadataIndex, _StorageInfo


def _check_structure(md, ckpt: Path, meta_file: Path) -> None:
    """The metadata is well-formed, refers only to files in ``ckpt`` that hold its chunks,
    and every entry is a tensor (never a pickled object)."""
    Metadata, TensorMD, BytesMD, Index, Info = _dcp_types()

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{meta_file} is not valid checkpoint metadata: {why}")

    if type(md) is not Metadata:
        raise bad(f"it holds a {type(md).__name__}, not a {Metadata.__name__}")
    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        raise bad("state_dict_metadata / storage_data are not dicts")
    sizes: dict[str, int] = {}
    for key, info in md.storage_data.items():
        if type(key) is not Index or type(info) is not Info:
            raise bad(f"storage_data holds a {type(key).__name__} -> {type(info).__name__}")
        rel = info.relative_path
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise bad(f"entry {key.fqn!r} points outside the checkpoint directory ({rel!r})")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            raise bad(f"entry {key.fqn!r} has an invalid byte range")
        if rel not in sizes:
            data = ckpt / rel
            if not data.is_file():
                raise CheckpointError(f"checkpoint {ckpt} lacks {rel}, which its .metadata lists")
            sizes[rel] = data.stat().st_size
        if info.offset + info.length > sizes[rel]:
            raise CheckpointError(f"{ckpt / rel} is truncated: {sizes[rel]} bytes, but .metadata places entry "
                                  f"{key.fqn!r} at bytes {info.offset}..{info.offset + info.length}")
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise bad(f"an entry name is a {type(fqn).__name__}")
        if isinstance(entry, BytesMD):
            raise CheckpointError(f"refusing to load {meta_file}: entry {fqn!r} is a pickled object; this "
                                  "project's checkpoints hold only tensors")
        if type(entry) is not TensorMD or not isinstance(entry.properties.dtype, torch.dtype):
            raise bad(f"entry {fqn!r} is a {type(entry).__name__}")
        size = tuple(entry.size)
        covered = 0
        for chunk in entry.chunks:
            off, sz = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(off) != len(size) or len(sz) != len(size) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(off, sz, size)):
                raise bad(f"entry {fqn!r} has a chunk {list(sz)} at {list(off)} outside its size {list(size)}")
            info = md.storage_data.get(Index(fqn, off))
            if info is None:
                raise bad(f"entry {fqn!r} has no stored data for its chunk at {list(off)}")
            nbytes = math.prod(sz) * entry.properties.dtype.itemsize
            if info.length < nbytes:
                raise bad(f"entry {fqn!r}: {info.length} stored bytes cannot hold a {list(sz)} "
                          f"{entry.properties.dtype} chunk")
            covered += math.prod(sz)
        if covered != math.prod(size):
            raise bad(f"entry {fqn!r}: its chunks cover {covered} of {math.prod(size)} elements")


def verify_dcp_metadata(path: str | Path):
    """Read ``<path>/.metadata`` with ``RestrictedUnpickler`` and check it; returns the
    ``Metadata``.  Raises ``CheckpointError`` (one line naming the file) otherwise."""
    ckpt = Path(path)
    meta_file = ckpt / ".metadata"
    try:
        with open(meta_file, "rb") as fh:
            md = RestrictedUnpickler(fh).load()
    except RefusedGlobal as e:
        raise CheckpointError(f"refusing to load {meta_file}: it references {e.qualname}, which a checkpoint "
                              "never contains") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} has no .metadata (not a sharded checkpoint, or an "
                              "incomplete copy)") from None
    except Exception as e:  # truncated / garbage: EOFError, UnpicklingError, TypeError from a bad REDUCE, ...
        raise CheckpointError(f"cannot read {meta_file}: damaged ({_first_line(e)})") from None
    _check_structure(md, ckpt, meta_file)
    return md


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType

    class SafeFileSystemReader(FileSystemReader):
        """A ``FileSystemReader`` that serves the verified metadata and refuses pickled entries.

        ``read_metadata`` takes no ``rank`` argument on purpose: DCP then never falls back to
        rank-local ``__<rank>.metadata`` files (which this project never writes).
        """

        def __init__(self, path, metadata=None):
            super().__init__(path)
            self._verified = metadata

        def read_metadata(self):  # noqa: D102 -- see the class doc
            from torch.distributed.checkpoint.metadata import StorageMeta

            if self._verified is None:
                self._verified = verify_dcp_metadata(self.path)
            md = self._verified
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

        def read_data(self, plan, planner):
            per_file: dict[str, list] = {}
            for item in plan.items:
                rel = self.storage_data[item.storage_index].relative_path
                if item.type == LoadItemType.BYTE_IO:
                    raise CheckpointError(f"refusing to load {Path(str(self.path)) / rel}: entry "
                                          f"{item.storage_index.fqn!r} is a pickled object")
                per_file.setdefault(rel, []).append(item)
            for rel, items in per_file.items():  # one file at a time, so a failure can name it
                try:
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"cannot read {Path(str(self.path)) / rel}: "
                                          f"{describe_load_error(e)}") from None
            return _done()

    return SafeFileSystemReader


def _done():
    from torch.futures import Future
    fut: Future = Future()
    fut.set_result(None)
    return fut


def safe_reader(path: str | Path, metadata=None):
    """A ``SafeFileSystemReader`` for ``path`` (metadata: from ``verify_dcp_metadata``)."""
    return _reader_class()(str(path), metadata)


def _dcp_error_line(e: BaseException, path: Path) -> str:
    failures = getattr(e, "failures", None) or {}  # CheckpointException: rank -> (exception, traceback)
    cause = failures[min(failures)] if failures else e
    if isinstance(cause, tuple):
        cause = cause[0]
    if isinstance(cause, CheckpointError):
        return str(cause)
    line = _first_line(cause)
    m = re.match(r"Missing key in checkpoint state_dict: (.*?)\.?$", line)
    if m:
        return f"checkpoint {path} lacks {m.group(1)!r} (saved from a different model, or incomplete)"
    return f"cannot load checkpoint {path}: {line}"


def load_dcp(entries: dict, path: str | Path, no_dist: bool = False) -> None:
    """``dcp.load(entries)`` from the checkpoint directory ``path``, safely (see module doc).

    Under torchrun every rank raises the same one-line ``CheckpointError`` on failure.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    md = verify_dcp_metadata(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no process group" when no_dist
            dcp.load(entries, storage_reader=safe_reader(path, md), no_dist=no_dist)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(_dcp_error_line(e, path)) from None


def load_dcp_full(path: str | Path) -> dict:
    """Every entry of the DCP checkpoint ``path`` as full CPU tensors, in one process."""
    path = Path(path)
    md = verify_dcp_metadata(path)
    try:
        entries = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    except RuntimeError as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {_first_line(e)}") from None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(entries, storage_reader=safe_reader(path, md), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(_dcp_error_line(e, path)) from None
    return entries


def read_partitions(path: str | Path) -> dict:
    """``<path>/partitions.json`` (fused-parameter layout and run config of a DCP checkpoint)."""
    f = Path(path) / "partitions.json"
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} lacks partitions.json (the layout of its fused parameters "
                              "and its run config); it is incomplete") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {f}: {_first_line(e)}") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k, {}), dict) for k in ("model", "optim", "config")):
        raise CheckpointError(f"{f} is not a partitions file (expected an object with model / optim / config)")
    return meta

