"""Convert between sharded (DCP) checkpoints and single-file consolidated state dicts.

    python tools/convert_checkpoint.py to-single runs/x/checkpoints/step_00000100 model.pt
    python tools/convert_checkpoint.py to-dcp model.pt runs/y/checkpoints/step_00000100

An existing dst is replaced only with ``--overwrite`` (never the src); the output appears
complete or not at all.

``to-single`` writes ``{"model": <single-process GPTModel state dict>, "optimizer": {fqn:
{exp_avg, exp_avg_sq, step}}, "step", "config"}``: tensor-parallel shards are joined, the
``.part<j>`` pieces of fused parameters are concatenated back, and the result loads into
``GPTModel(config).load_state_dict`` as is.  ``to-dcp`` goes back (one process, no
torchrun): the result loads into any parallel layout.  ``to-dcp`` also takes the
single-process trainer's own ``state.pt`` (its AdamW state is keyed by parameter index:
mapped to parameter names in ``build_optimizer``'s order; fused-parameter partitions come
from the tensor-parallel model of its config), so a single-process run continues under
torchrun from the converted directory (put it at ``<run_dir>/checkpoints/step_XXXXXXXX``).

Every input is read without executing anything in it (``megatron_ufp4.training.safe_load``);
a bad one is refused with one line naming the file.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

PART = ".part"


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


def to_single(src: Path, dst: Path) -> None:
    from megatron_ufp4.outputs import SyncedWriter, atomic_file
    from megatron_ufp4.training.dist_checkpoint import load_consolidated

    state = load_consolidated(src)
    with atomic_file(dst) as tmp, SyncedWriter(tmp) as f:  # a full disk: the real errno, not torch's "pos"
        torch.save(state, f)


def _layout_of(config: dict):
    """(single-process GPTModel, TP=1 parallel GPTModel), both on the meta device (no memory)."""
    from megatron_ufp4.config import config_from_saved
    from megatron_ufp4.model import GPTModel, LinearFactory
    from megatron_ufp4.parallel.parallel_factory import ParallelLinearFactory
    from megatron_ufp4.parallel.state import build_parallel_state

    cfg = config_from_saved(config)
    recipe, backend = cfg.build_recipe()
    with torch.device("meta"):
        single = GPTModel(cfg.model, LinearFactory(recipe, num_layers=cfg.model.num_layers, backend=backend,
                                                   seed=cfg.training.seed))
        st = build_parallel_state(tp=1, pp=1, dp=1, model_cfg=cfg.model)
        factory = ParallelLinearFactory(recipe, cfg.model.num_layers, st, backend=backend, seed=cfg.training.seed,
                                        device="meta")
        parallel = GPTModel(cfg.model, factory, device="meta", **factory.model_kwargs())
    return cfg, single, parallel


def _from_single_process(data: dict, src: Path) -> tuple[dict, dict, dict]:
    """A single-process ``Trainer`` state (torch AdamW state with integer parameter ids) as
    (model state dict, {fqn: {exp_avg, exp_avg_sq, step}}, partitions), in the layout the
    multi-process trainer saves."""
    from megatron_ufp4.training.checkpoint import CheckpointError
    from megatron_ufp4.training.dist_checkpoint import partitions_of
    from megatron_ufp4.training.optim import param_groups

    cfg, single, parallel = _layout_of(data["config"])
    model_sd = data["model"]
    want = set(parallel.state_dict().keys())
    if set(model_sd) != want:
        extra, missing = sorted(set(model_sd) - want), sorted(want - set(model_sd))
        raise CheckpointError(f"{src}: its model does not match its config ("
                              + (f"lacks {missing[0]!r}" if missing else f"has an unexpected {extra[0]!r}") + ")")
    # torch.optim numbers parameters in param_groups order: build_optimizer's groups over named_parameters
    name_of = {id(p): n for n, p in single.named_parameters()}
    groups = param_groups(single, cfg.optimizer.weight_decay)
    saved = data["optimizer"].get("param_groups")
    if not isinstance(saved, list) or [len(g.get("params", [])) for g in saved] != [len(g["params"]) for g in groups]:
        raise CheckpointError(f"{src}: its optimizer's parameter groups do not match the model of its config")
    fqn_of = {pid: name_of[id(p)]
              for g_saved, g in zip(saved, groups) for pid, p in zip(g_saved["params"], g["params"])}
    params = dict(single.named_parameters())
    optimizer = {}
    for pid, fqn in fqn_of.items():
        st = data["optimizer"].get("state", {}).get(pid)
        shape = tuple(params[fqn].shape)
        if st is None:  # never stepped (e.g. an expert that got no tokens): AdamW's fresh state, exactly
            st = {"exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape), "step": torch.zeros(())}
        if tuple(st["exp_avg"].shape) != shape or tuple(st["exp_avg_sq"].shape) != shape:
            raise CheckpointError(f"{src}: optimizer state of {fqn} has shape {tuple(st['exp_avg'].shape)}, "
                                  f"the parameter {shape}")
        optimizer[fqn] = {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"],
                          "step": torch.as_tensor(st["step"]).detach().float().reshape(())}
    partitions = partitions_of(parallel.named_parameters())  # as the distributed trainer records them
    return model_sd, optimizer, partitions


def to_dcp(src: Path, dst: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from megatron_ufp4.config import config_from_saved, dump_config
    from megatron_ufp4.training.safe_load import load_state_file

    data = load_state_file(src, require=("model", "config", "step", "optimizer"))
    if "param_groups" in data["optimizer"]:  # the single-process Trainer's own state.pt
        model_sd, optimizer, partitions = _from_single_process(data, src)
        trainer = {"step": int(data["step"]), "skipped_total": int(data.get("skipped_total", 0)),
                   "consecutive_nonfinite": int(data.get("consecutive_nonfinite", 0))}
    else:  # a to-single file
        model_sd, optimizer, partitions = data["model"], data["optimizer"], data.get("partitions", {})
        trainer = data.get("trainer") or {"step": int(data["step"]), "skipped_total": 0, "consecutive_nonfinite": 0}
    flat: dict = {f"trainer.{k}": torch.tensor(int(v)) for k, v in trainer.items()}
    for k, v in model_sd.items():
        if isinstance(v, dict):
            flat.update({f"model.{k}.{f}": t for f, t in v.items()})
        else:
            flat[f"model.{k}"] = v
    for fqn, st in optimizer.items():
        flat.update({f"optim.{fqn}.{f}": t for f, t in st.items()})
    flat = _split_parts(flat, {f"model.{k}": i for k, i in partitions.get("model", {}).items()}
                        | {f"optim.{k}": i for k, i in partitions.get("optim", {}).items()})
    from megatron_ufp4.outputs import atomic_dir

    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dst) as tmp, warnings.catch_warnings():  # "no process group: saving from one process"
        warnings.simplefilter("ignore", UserWarning)  # is the point here
        dcp.save(flat, checkpoint_id=str(tmp), no_dist=True)
        (tmp / "partitions.json").write_text(json.dumps({**partitions, "config": data["config"]}))
        (tmp / "config.yaml").write_text(dump_config(config_from_saved(data["config"])), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-single", help="DCP checkpoint directory -> one .pt file")
    a.add_argument("src", type=Path)
    a.add_argument("dst", type=Path)
    b = sub.add_parser("to-dcp", help="consolidated .pt file -> DCP checkpoint directory")
    b.add_argument("src", type=Path)
    b.add_argument("dst", type=Path)
    for p in (a, b):
        p.add_argument("--overwrite", action="store_true", help="replace an existing dst")
    args = ap.parse_args(argv)
    from megatron_ufp4.outputs import check_output

    try:
        check_output(args.dst, overwrite=args.overwrite, inputs=[args.src], units=[args.src], what="dst",
                     make_parents=args.cmd == "to-dcp")
        if args.cmd == "to-single":
            if not (args.src / ".metadata").is_file():
                raise ValueError(f"{args.src} is not a DCP checkpoint directory (no .metadata)")
            to_single(args.src, args.dst)
        else:
            if not args.src.is_file():
                raise ValueError(f"{args.src}: no such file")
            to_dcp(args.src, args.dst)
    except KeyError as e:  # a field the checkpoint should hold (e.g. an optimizer state's exp_avg)
        print(f"convert_checkpoint.py: error: {args.src} lacks {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"convert_checkpoint.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
