"""Export a checkpoint to a Hugging Face directory (transformers' from_pretrained reads it offline).

    python tools/export_hf.py runs/x OUT_DIR [--max-shard-size 5GB] [--tokenizer data/x.model | --no-tokenizer]

RUN_DIR_OR_CHECKPOINT: a run directory (its latest checkpoint), a single-process checkpoint
(``step_*`` directory or ``state.pt``, or a ``to-single`` file) or a sharded (DCP) checkpoint
directory.  Writes config.json, model.safetensors (above --max-shard-size:
model-0000k-of-0000n.safetensors + model.safetensors.index.json), generation_config.json and
the tokenizer (the run's sentencepiece model as tokenizer.json + tokenizer.model, or its Hugging Face
tokenizer.json as it is).
Which transformers class, and what is refused: docs/huggingface.md.  Errors: one line, exit 2,
nothing written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    ap.add_argument("out", type=Path, metavar="OUT_DIR")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB, as transformers)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="sentencepiece .model, tokenizer.json or a directory holding one (default: the run's "
                         "data.tokenizer, else the one stored with its data.prefix dataset)")
    ap.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    args = ap.parse_args(argv)
    from megatron_ufp4.hf.convert import export_hf, run_tool

    return run_tool("export_hf.py", lambda: export_hf(args.src, args.out, args.max_shard_size, args.tokenizer,
                                                      not args.no_tokenizer))


if __name__ == "__main__":
    sys.exit(main())
