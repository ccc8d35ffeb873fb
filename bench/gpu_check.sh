#!/usr/bin/env bash
# The GPU checks of issue 20, in one script that fits 8 minutes on one GPU: the device suite (tests/test_cuda.py),
# the training-throughput bench (LTM-S vs its Llama peer, eager and compiled, with a profile of one LTM step), the
# decoding bench (static cache, compiled decoding) and the main job's commands. Every command runs under `timeout`,
# within a total budget; results go to bench/results/*-cuda.json and a log per command to bench/results/gpu-check/.
#
#     bash bench/gpu_check.sh            # on a GPU machine (torch with CUDA, the project importable)
#     bash bench/gpu_check.sh --cpu      # the same commands at CPU size, on the CPU: checks the script itself
#
# On a GPU machine without internet (docs/gpu.md): put the wheels it lacks in .whl and the embedded corpus in
# .ltmcache on a machine with internet, carry both, install the wheels into a folder on PYTHONPATH, then this script.
# Environment: PYTHON (default python3), GPU_CHECK_RESULTS (folder, default bench/results), GPU_CHECK_BUDGET
# (seconds, default 470), GPU_CHECK_STEPS (which steps, a
# space-separated subset of "suite train train-compile generate compile-layers old-path main"), OUT (if set, a tarball
# of the results is copied there).
set -u
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-470}
STEPS=${GPU_CHECK_STEPS:-"suite train train-compile generate compile-layers old-path main"}
RESULTS=${GPU_CHECK_RESULTS:-bench/results}
LOGS=$RESULTS/gpu-check
SUFFIX=$([ "$MODE" = gpu ] && echo cuda || echo cpu-smoke)
mkdir -p "$LOGS"
START=$(date +%s)
SUMMARY="$LOGS/summary-$SUFFIX.txt"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME LIMIT COMMAND...: the command under `timeout`, its output in $LOGS/NAME.log, one summary line.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    say "SKIP $name: the ${BUDGET}s budget is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local begin=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$? took=$(($(date +%s) - begin))
  local verdict=ok
  [ $rc -ne 0 ] && verdict="FAILED (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT after ${limit}s"
  say "$verdict $name (${took}s): $*"
  tail -n 4 "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
}

wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

say "gpu_check ($MODE) $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
$PY - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}")
EOF

if [ "$MODE" = gpu ]; then
  DEVICE=(--device cuda --dtype bf16)
  TRAIN=(--peak-tflops 989 --steps 8)  # H100/H200 SXM dense bf16 peak, the datasheet's
  SUITE_ENV=()
  GEN=()
else
  DEVICE=(--device cpu --dtype fp32)
  TRAIN=(--preset configuration/ltm-tiny.json --seq-length 64 --batch-size 2 --steps 2 --warmup-steps 1)
  STEPS=${GPU_CHECK_STEPS:-"suite train generate old-path"}  # the compiled variants take minutes on a CPU
  SUITE_ENV=(env LTM_DEVICE_SUITE=cpu)
  GEN=(--preset configuration/ltm-tiny.json --new-tokens 8 --batch-sizes 1 --repeats 1 --cache-implementation static)
fi

PER_TEST=()
$PY -c "import pytest_timeout" 2> /dev/null && PER_TEST=(--timeout 150)
wants suite && run device-suite 210 "${SUITE_ENV[@]}" $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_cuda.py \
  "${PER_TEST[@]}" --junitxml "$LOGS/device-suite-$SUFFIX.xml"
wants train && run train-throughput 150 $PY bench/train_throughput.py "${DEVICE[@]}" "${TRAIN[@]}" \
  --json "$RESULTS/train_throughput-$SUFFIX.json" --profile "$RESULTS/train_profile-$SUFFIX.json"
wants train-compile && run train-throughput-compiled 200 $PY bench/train_throughput.py "${DEVICE[@]}" "${TRAIN[@]}" \
  --compile --json "$RESULTS/train_throughput-compiled-$SUFFIX.json"
wants generate && run generate 150 $PY bench/generate.py "${DEVICE[@]}" "${GEN[@]}" \
  --json "$RESULTS/generate-$SUFFIX.json"
# Variants of the LTM alone: its decoder layers compiled in place too (the fast loop then runs compiled kernels in its
# graphs), and the path before this work (no CUDA graphs, float32 cross-entropy) for the record.
wants compile-layers && run train-throughput-compiled-layers 150 $PY bench/train_throughput.py "${DEVICE[@]}" \
  "${TRAIN[@]}" --models ltm --compile --compile-layers --json "$RESULTS/train_throughput-compiled-layers-$SUFFIX.json"
wants old-path && run train-throughput-old-path 120 env LTM_CUDA_GRAPHS=0 LTM_TOKEN_NLL=native $PY \
  bench/train_throughput.py "${DEVICE[@]}" "${TRAIN[@]}" --models ltm --steps 4 \
  --json "$RESULTS/train_throughput-old-path-$SUFFIX.json"
if wants main; then
  if [ "$MODE" = cpu ]; then
    say "SKIP main-job on the CPU: make main runs it (with its install)"
  elif ! command -v make > /dev/null; then
    say "SKIP main-job: no make here"
  else
    run main-job 150 make main-job LTM="$PY -m modeling_ltm.tooling.cli" OUTPUT_DIR=runs/ltm-tiny-cuda
  fi
fi

say "total $(($(date +%s) - START))s"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-check-$SUFFIX.tgz" "$LOGS" "$RESULTS"/*-"$SUFFIX".json 2>/dev/null
  cp "$SUMMARY" "$OUT/"
fi
