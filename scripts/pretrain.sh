#!/usr/bin/env bash
# torchrun launcher for one node or many.  NCCL is used when GPUs are present, gloo otherwise.
#
# One node:   NPROC=4 CONFIG=configs/tiny_dense.yaml bash scripts/pretrain.sh parallel.tensor=2 parallel.pipeline=2
# Many nodes: on every node, with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK:
#             NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 CONFIG=... bash scripts/pretrain.sh ...
# Or a c10d rendezvous (no fixed node ranks): RDZV_ENDPOINT=node0:29400 NNODES=2 NPROC=8 bash scripts/pretrain.sh
#
# A rank that dies brings the job down (torchrun tears the group down); a rank that hangs
# makes the others fail their next collective after parallel.timeout_s (default 600 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/tiny_dense.yaml}
NNODES=${NNODES:-1}
NPROC=${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')}
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  LAUNCH=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-megatron_ufp4}")
else
  LAUNCH=(--node-rank="${NODE_RANK:-0}" --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" "${LAUNCH[@]}" \
  -m megatron_ufp4.train "$CONFIG" "$@"
