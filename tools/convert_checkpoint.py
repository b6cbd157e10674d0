"""Convert between sharded (DCP) checkpoints and single-file consolidated state dicts.

    python tools/convert_checkpoint.py to-single runs/x/checkpoints/step_00000100 model.pt
    python tools/convert_checkpoint.py to-dcp model.pt runs/y/checkpoints/step_00000100

``to-single`` writes ``{"model": <single-process GPTModel state dict>, "optimizer": {fqn:
{exp_avg, exp_avg_sq, step}}, "step", "config"}``: tensor-parallel shards are joined, the
``.part<j>`` pieces of fused parameters are concatenated back, and the result loads into
``GPTModel(config).load_state_dict`` as is.  ``to-dcp`` goes back (one process, no
torchrun): the result loads into any parallel layout.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

PART = ".part"


def _merge_parts(flat: dict, partitions: dict) -> dict:
    out, parts = {}, {}
    for k, v in flat.items():
        base, sep, j = k.rpartition(PART)
        if sep and j.isdigit() and base in partitions:
            parts.setdefault(base, {})[int(j)] = v
        else:
            out[k] = v
    for base, pieces in parts.items():
        out[base] = torch.cat([pieces[j] for j in sorted(pieces)], dim=partitions[base]["dim"])
    return out


def _split_parts(flat: dict, partitions: dict) -> dict:
    out = {}
    for k, v in flat.items():
        info = partitions.get(k)
        if info and info["stride"] > 1 and isinstance(v, torch.Tensor):
            for j, p in enumerate(v.chunk(info["stride"], dim=info["dim"])):
                out[f"{k}{PART}{j}"] = p.clone()
        else:
            out[k] = v
    return out


def _nest_extra_state(model_flat: dict) -> dict:
    """``x._extra_state.sr_generator`` → ``x._extra_state = {"sr_generator": ...}``."""
    out = {}
    for k, v in model_flat.items():
        head, sep, field = k.partition("._extra_state.")
        if sep:
            out.setdefault(f"{head}._extra_state", {})[field] = v
        else:
            out[k] = v
    return out


def to_single(src: Path, dst: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = json.loads((src / "partitions.json").read_text()) if (src / "partitions.json").is_file() else {}
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    dcp_to_torch_save(str(src), str(tmp))
    flat = torch.load(tmp, weights_only=True)
    tmp.unlink()
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    optim = {k[len("optim."):]: v for k, v in flat.items() if k.startswith("optim.")}
    model = _nest_extra_state(_merge_parts(model, meta.get("model", {})))
    optimizer: dict = {}
    for k, v in _merge_parts(optim, meta.get("optim", {})).items():
        fqn, _, field = k.rpartition(".")
        optimizer.setdefault(fqn, {})[field] = v
    trainer = {k[len("trainer."):]: int(v) for k, v in flat.items() if k.startswith("trainer.")}
    out = {"model": model, "optimizer": optimizer, "step": trainer.get("step", 0), "trainer": trainer,
           "config": meta.get("config", {}),
           "partitions": {"model": meta.get("model", {}), "optim": meta.get("optim", {})}}
    torch.save(out, dst)


def to_dcp(src: Path, dst: Path) -> None:
    import torch.distributed.checkpoint as dcp

    data = torch.load(src, map_location="cpu", weights_only=True)
    partitions = data.get("partitions", {})
    trainer = data.get("trainer") or {"step": int(data.get("step", 0)), "skipped_total": 0, "consecutive_nonfinite": 0}
    flat: dict = {f"trainer.{k}": torch.tensor(int(v)) for k, v in trainer.items()}
    for k, v in data["model"].items():
        if isinstance(v, dict):
            flat.update({f"model.{k}.{f}": t for f, t in v.items()})
        else:
            flat[f"model.{k}"] = v
    for fqn, st in data.get("optimizer", {}).items():
        flat.update({f"optim.{fqn}.{f}": t for f, t in st.items()})
    flat = _split_parts(flat, {f"model.{k}": i for k, i in partitions.get("model", {}).items()}
                        | {f"optim.{k}": i for k, i in partitions.get("optim", {}).items()})
    dst.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "no process group: saving from one process" is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(flat, checkpoint_id=str(dst), no_dist=True)
    (dst / "partitions.json").write_text(json.dumps({**partitions, "config": data.get("config", {})}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-single", help="DCP checkpoint directory -> one .pt file")
    a.add_argument("src", type=Path)
    a.add_argument("dst", type=Path)
    b = sub.add_parser("to-dcp", help="consolidated .pt file -> DCP checkpoint directory")
    b.add_argument("src", type=Path)
    b.add_argument("dst", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "to-single":
            if not (args.src / ".metadata").is_file():
                raise ValueError(f"{args.src} is not a DCP checkpoint directory (no .metadata)")
            to_single(args.src, args.dst)
        else:
            if not args.src.is_file():
                raise ValueError(f"{args.src}: no such file")
            to_dcp(args.src, args.dst)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"convert_checkpoint.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
