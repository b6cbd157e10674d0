"""Convert between sharded (DCP) checkpoints and single-file consolidated state dicts.

    python tools/convert_checkpoint.py to-single runs/x/checkpoints/step_00000100 model.pt
    python tools/convert_checkpoint.py to-dcp model.pt runs/y/checkpoints/step_00000100

An existing dst is replaced only with ``--overwrite`` (never the src); the output appears
complete or not at all.

``to-single`` writes ``{"model": <one-process model state dict>, "optimizer": {fqn:
{exp_avg, exp_avg_sq, step}}, "step", "trainer", "config"}``: tensor-parallel shards are
joined, the ``.part<j>`` pieces of fused parameters are concatenated back, and the result
loads into the model of its config as is.  ``to-dcp`` goes back (one process, no torchrun);
it also takes the ``state.pt`` of older single-process runs.  Training itself needs neither:
it writes sharded checkpoints on every layout and resumes from a single file directly.

Every input is read without executing anything in it (``megatron_ufp4.training.safe_load``);
a bad one is refused with one line naming the file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def to_single(src: Path, dst: Path) -> None:
    from megatron_ufp4.outputs import SyncedWriter, atomic_file
    from megatron_ufp4.training.dist_checkpoint import load_consolidated

    state = load_consolidated(src)
    with atomic_file(dst) as tmp, SyncedWriter(tmp) as f:  # a full disk: the real errno, not torch's "pos"
        torch.save(state, f)


def to_dcp(src: Path, dst: Path) -> None:
    from megatron_ufp4.outputs import atomic_dir
    from megatron_ufp4.training.checkpoint_formats import read_single_file, write_sharded

    state = read_single_file(src, require=("model", "config", "step", "optimizer"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dst) as tmp:
        write_sharded(state, tmp)


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
