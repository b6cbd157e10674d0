#!/usr/bin/env bash
# Set up the environment, lint (ruff.toml) and run the whole test suite (CPU only, about 6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
"${PYTHON:-python3}" -m ruff check .
exec "${PYTHON:-python3}" -m pytest -q --timeout 900 --durations=25 "$@"
