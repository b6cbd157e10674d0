#!/usr/bin/env bash
# The GPU check, one command on a machine with one CUDA GPU (estimated 10-15 minutes on an H100/H200):
#
#   bash scripts/gpu_check.sh                  # from any directory
#   CUDA_VISIBLE_DEVICES=3 bash scripts/gpu_check.sh
#   RESULTS_DIR=/tmp/check STEPS=40 RECIPES="bf16 ufp4" bash scripts/gpu_check.sh
#
# (a) the CUDA tests, tests/test_cuda_*.py (quantizer bits, QuantizedLinear, SR checkpoints, exact resume, training
#     on the GPU; see its docstring), the compiled Triton kernels against emulated
#     (tests/test_triton_backend.py) and the native FP4 GEMM (tests/test_native_backend.py; its GEMM
#     test needs compute capability 10.x), (b) prepares a small corpus from tests/data/shakespeare_sample.txt
#     and trains tiny_dense and tiny_moe for $STEPS steps per recipe on the GPU through the train CLI with
#     the emulated backend, and with the triton and triton_bf16 backends for $TRITON_RECIPES
#     (final loss and median step time per run; eval and sample CLIs on one run), (c) runs
#     bench/bench_gpu.py.  Everything goes to one markdown file, $RESULTS_DIR/gpu_check.md (printed at
#     the start and the end; default runs/gpu_check/<UTC time>/, which git ignores).  A part that fails
#     does not stop the others; the exit status is 0 only if every part passed.  No visible CUDA GPU:
#     one line and exit 1 before anything else runs.
#
# Environment: PYTHON (default python3), DEVICE (training.device value, default cuda: GPU 0 of the
# visible ones), STEPS (20), RECIPES (all presets), DTYPE (training.dtype, default bf16),
# TRITON_RECIPES (ufp4 nvfp4), PART_TIMEOUT_S (limit of each command, default 300), TEST_TIMEOUT_S (limit of each
# test command, default 600: the Triton tests compile each kernel configuration on first use),
# SKIP_TESTS=1 / SKIP_BENCH=1 to leave a part out.
# DEVICE=cpu GPU_CHECK_ALLOW_CPU=1: a logic dry run of this script on a CPU-only machine (tests with
# MEGATRON_UFP4_TEST_DEVICE=cpu, the bench with --small); its numbers say nothing about a GPU.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-20}
RECIPES=${RECIPES:-"bf16 ufp4 e2m1_ref nvfp4 mxfp4"}
TRITON_RECIPES=${TRITON_RECIPES:-"ufp4 nvfp4"}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-600}
DTYPE=${DTYPE:-bf16}
PART_TIMEOUT_S=${PART_TIMEOUT_S:-300}

if ! "$PY" - "$DEVICE" <<'EOF'
import os, sys
try:
    import torch
except ImportError as e:
    sys.exit(f"gpu_check: cannot import torch ({e}); install the project first (docker/Dockerfile)")
dev = sys.argv[1]
if dev == "cpu" and os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
    sys.exit(0)  # the logic dry run
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}, "
             f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
try:
    index = torch.device(dev).index or 0
except RuntimeError:
    index = -1
if not dev.startswith("cuda") or not 0 <= index < torch.cuda.device_count():
    sys.exit(f"gpu_check: DEVICE={dev} is not one of the {torch.cuda.device_count()} visible GPU(s) (cuda, cuda:N)")
EOF
then
  exit 1
fi

[[ "$DEVICE" == cpu ]] && export TRITON_INTERPRET=1  # the dry run: the triton backends in Triton's interpreter
RESULTS_DIR=${RESULTS_DIR:-runs/gpu_check/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS_DIR" || exit 1
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
REPORT="$RESULTS_DIR/gpu_check.md"
WORK="$RESULTS_DIR/work"  # corpus, run directories (kept for a look afterwards)
mkdir -p "$WORK"
echo "gpu_check: results in $REPORT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS (the resume test)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not

declare -a SUMMARY=()
FAILED=0
note() { printf '%s\n' "$@" | tee -a "$REPORT"; }  # one line per argument
part_result() {  # name rc seconds
  local verdict=PASS
  if [[ "$2" != 0 ]]; then verdict="FAIL (exit $2)"; FAILED=1; fi
  [[ "$2" == 124 ]] && verdict="FAIL (timed out after ${PART_TIMEOUT_S}s)"
  SUMMARY+=("| $1 | $verdict | $3 s |")
  note "" "**$1: $verdict** in $3 s"
}
fenced() {  # run a command, its output both on the console and in a fenced block of the report
  local rc  # (FOLD=label: the block folded under <details>, for long outputs; LIMIT_S: its own time limit)
  [[ -n "${FOLD:-}" ]] && printf '<details><summary>%s</summary>\n\n' "$FOLD" >> "$REPORT"
  echo '```' >> "$REPORT"
  timeout "${LIMIT_S:-$PART_TIMEOUT_S}" "$@" 2>&1 | tee -a "$REPORT"
  rc=${PIPESTATUS[0]}
  echo '```' >> "$REPORT"
  [[ -n "${FOLD:-}" ]] && printf '\n</details>\n' >> "$REPORT"
  return "$rc"
}

{
  echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  if commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); then
    git -C "$REPO" diff --quiet HEAD 2>/dev/null || commit="$commit (+ uncommitted changes)"
  else
    commit=${MEGATRON_UFP4_COMMIT:-unknown}  # the docker image has no .git (docker/Dockerfile: GIT_COMMIT)
  fi
  echo "commit \`$commit\`, device \`$DEVICE\`, $STEPS steps, dtype $DTYPE"
  echo
  echo '```'
  "$PY" -c "import torch, platform; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| python', platform.python_version()); [print(f'cuda:{i}', torch.cuda.get_device_name(i), f'{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB') for i in range(torch.cuda.device_count())]"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed (the fused backend's CUDA path is skipped)"
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
  echo '```'
} | tee -a "$REPORT"

# -- (a) the CUDA tests ---------------------------------------------------------------------------
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  note "" "## (a) tests/test_cuda_*.py on $DEVICE" ""
  t0=$SECONDS
  MEGATRON_UFP4_TEST_DEVICE="$DEVICE" LIMIT_S=$TEST_TIMEOUT_S fenced "$PY" -m pytest -q -m cuda -rfEs -p no:cacheprovider \
    --basetemp="$WORK/pytest" tests/test_cuda_quantizer.py tests/test_cuda_linear.py tests/test_cuda_training.py
  part_result "tests/test_cuda_*.py" $? $((SECONDS - t0))
  note "" "## (a') tests/test_triton_backend.py and test_native_backend.py on $DEVICE (compiled Triton kernels vs emulated, native FP4 GEMM)" ""
  t0=$SECONDS
  MEGATRON_UFP4_TEST_DEVICE="$DEVICE" LIMIT_S=$TEST_TIMEOUT_S fenced "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    --basetemp="$WORK/pytest_triton" tests/test_triton_backend.py tests/test_native_backend.py
  part_result "tests/test_triton_backend.py + test_native_backend.py" $? $((SECONDS - t0))
fi

# -- (b) 20 steps per recipe, dense and MoE -------------------------------------------------------
note "" "## (b) tiny_dense and tiny_moe, $STEPS steps per recipe on $DEVICE (training.dtype=$DTYPE)" ""
t0=$SECONDS
PREFIX="$WORK/corpus/shk"
fenced "$PY" -m megatron_ufp4.data.prepare --input tests/data/shakespeare_sample.txt --output "$PREFIX" \
  --vocab-size 512 --split-paragraphs --val-fraction 0.1 --seed 0
rc=$?
if [[ $rc == 0 ]]; then
  runs=()  # config:recipe:backend
  for config in tiny_dense tiny_moe; do
    for recipe in $RECIPES; do runs+=("$config:$recipe:emulated"); done
    for recipe in $TRITON_RECIPES; do runs+=("$config:$recipe:triton" "$config:$recipe:triton_bf16"); done
  done
  for spec in "${runs[@]}"; do
    IFS=: read -r config recipe backend <<< "$spec"
    run_dir="$WORK/runs/$config-$recipe-$backend"
    note "" "### $config / $recipe / $backend" ""
    FOLD="train CLI output: resolved config, recipe table, $STEPS steps" fenced "$PY" -m megatron_ufp4.train "configs/$config.yaml" "recipe.name=$recipe" "training.device=$DEVICE" \
      "gemm.backend=$backend" "training.dtype=$DTYPE" "data.prefix=$PREFIX" model.vocab_size=512 "training.train_steps=$STEPS" \
      "training.run_dir=$run_dir" training.eval_interval=0 training.eval_iters=4 checkpoint.interval=0 \
      "checkpoint.save_final=$([[ $spec == tiny_dense:ufp4:emulated ]] && echo true || echo false)" \
      schedule.warmup_steps=4 logging.interval=1 training.overwrite=true \
      || { rc=1; note "" "**$config / $recipe / $backend failed**"; }
  done
  dense_ufp4="$WORK/runs/tiny_dense-ufp4-emulated"
  if [[ -d "$dense_ufp4/checkpoints" ]]; then
    note "" "### eval and sample CLIs on $DEVICE (tiny_dense / ufp4)" ""
    fenced "$PY" -m megatron_ufp4.eval "$dense_ufp4" --device "$DEVICE" || rc=1
    fenced "$PY" -m megatron_ufp4.sample "$dense_ufp4" --device "$DEVICE" --prompt "ROMEO:" --max-new-tokens 40 || rc=1
  fi
  note "" "### per run: loss and step time" ""
  "$PY" - "$WORK/runs" "$STEPS" <<'EOF' | tee -a "$REPORT"
import json, statistics, sys
from pathlib import Path
import yaml
root, steps = Path(sys.argv[1]), int(sys.argv[2])
print("| config | recipe | backend | first loss | final loss | median step (steps 6+) | skipped |")
print("|---|---|---|---|---|---|---|")
bad = not root.is_dir()
for run in sorted(root.iterdir()) if root.is_dir() else []:
    config, recipe, backend = run.name.split("-", 2)
    path = run / "metrics.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    recs = [r for r in recs if "loss" in r and "step" in r]
    if len(recs) < steps:
        print(f"| {config} | {recipe} | {backend} | - | - | - | only {len(recs)} of {steps} steps |")
        bad = True
        continue
    tps = [r["tokens_per_s"] for r in recs[5:] if r.get("tokens_per_s")]
    cfg = yaml.safe_load(open(f"configs/{config}.yaml"))
    tokens = cfg["training"]["global_batch_size"] * cfg["data"]["seq_len"]
    first, last = recs[0]["loss"], recs[-1]["loss"]
    # logging.interval=1: each record's tokens/s is that step's own wall time
    ms = statistics.median(tokens / t * 1e3 for t in tps) if tps else float("nan")
    skipped = recs[-1].get("skipped_total", 0)
    ok = first is not None and last is not None and last < first
    bad |= not ok
    fl = lambda v: "NaN" if v is None else f"{v:.4f}"
    print(f"| {config} | {recipe} | {backend} | {fl(first)} | {fl(last)}{'' if ok else ' (did not go down)'} | {ms:.1f} ms | {skipped} |")
sys.exit(1 if bad else 0)
EOF
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
fi
part_result "tiny_dense + tiny_moe x {$RECIPES} (emulated), {$TRITON_RECIPES} (triton, triton_bf16), $STEPS steps" $rc $((SECONDS - t0))

# -- (c) the benchmark ----------------------------------------------------------------------------
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  note "" "## (c) bench/bench_gpu.py on $DEVICE" ""
  t0=$SECONDS
  BENCH_ARGS=()
  [[ "$DEVICE" == cpu ]] && BENCH_ARGS=(--small)
  # its markdown tables go into the report as tables (--out); its whole output, folded, after them
  timeout "$PART_TIMEOUT_S" "$PY" bench/bench_gpu.py --device "$DEVICE" "${BENCH_ARGS[@]}" --recipes "${RECIPES// /,}" \
    --backends emulated,triton,triton_bf16 --out "$RESULTS_DIR/bench_gpu.md" 2>&1 | tee "$RESULTS_DIR/bench_gpu.log"
  rc=${PIPESTATUS[0]}
  [[ -f "$RESULTS_DIR/bench_gpu.md" ]] && cat "$RESULTS_DIR/bench_gpu.md" >> "$REPORT"
  { printf '\n<details><summary>bench_gpu.py output</summary>\n\n```\n'; cat "$RESULTS_DIR/bench_gpu.log"
    printf '```\n\n</details>\n'; } >> "$REPORT"
  part_result "bench/bench_gpu.py" $rc $((SECONDS - t0))
fi

{
  echo
  echo "## Summary"
  echo
  echo "| part | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "total ${SECONDS} s"
} | tee -a "$REPORT"
echo "gpu_check: results in $REPORT"
exit "$FAILED"
