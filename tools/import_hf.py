"""Import a Hugging Face checkpoint (Llama family, Qwen3, Mixtral, Qwen3Moe, Glm4Moe) as our checkpoint.

    python tools/import_hf.py HF_DIR OUT
    python -m megatron_ufp4.train OUT/config.yaml data.prefix=data/x training.run_dir=runs/y

Writes OUT/state.pt (weights, the run config, step 0), OUT/config.yaml (a full run config:
the model section from config.json, ``training.init_from: OUT/state.pt`` -- a fresh start
from these weights with a fresh optimizer) and OUT/tokenizer.model when HF_DIR has a
sentencepiece one (prepare data with ``--tokenizer-model OUT/tokenizer.model``).  Only
safetensors weights are read.  Errors: one line, exit 2, nothing written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path, metavar="HF_DIR")
    ap.add_argument("out", type=Path, metavar="OUT")
    args = ap.parse_args(argv)
    from megatron_ufp4.hf.convert import import_hf, run_tool

    return run_tool("import_hf.py", lambda: import_hf(args.hf_dir, args.out))


if __name__ == "__main__":
    sys.exit(main())
