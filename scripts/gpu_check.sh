#!/usr/bin/env bash
# One command for the H200 machine (no network): build the extension with CUDA, run the test suite
# on CUDA, run compute-sanitizer on small shapes, run the benchmarks, print a summary table.
#   scripts/gpu_check.sh [--quick] [--no-bench] [--no-sanitizer] [--prebuilt] [--e2e] [--train]
#     --prebuilt  use the extension already in flux_attention/ when it imports with CUDA (e.g. one
#                 built elsewhere against the same torch and carried over) instead of building
#     --e2e       also run bench/e2e.py (Llama-3.1-8B shape through transformers, ~5 min; again with
#                 fuse_ops, ~5.5 min) and
#                 bench/e2e_profile.py (its per-layer kernel breakdown, ~40 s)
#     --train     also run scripts/train_gpu_check.sh (8B-shape router training throughput, ~2.5 min)
# Logs and results go to $OUT (the device tool's output folder) or /tmp/flux-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flux-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for every tool below
PY=${PY:-python3}
QUICK=0; BENCH=1; SANITIZER=1; PREBUILT=0; E2E=0; TRAIN=0
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    --no-bench) BENCH=0 ;;
    --no-sanitizer) SANITIZER=0 ;;
    --prebuilt) PREBUILT=1 ;;
    --e2e) E2E=1 ;;
    --train) TRAIN=1 ;;
    *) echo "gpu_check.sh: unknown option $a"; exit 2 ;;
  esac
done

declare -a names results
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record pass/fail and seconds
  local name=$1; shift
  local t0=$(date +%s)
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  names+=("$name"); results+=("$([ $rc = 0 ] && echo pass || echo "FAIL($rc)") $(( $(date +%s) - t0 ))s")
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

export FLUX_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-4}
# The H200 image sets CC/CXX to an /opt/gcc wrapper whose builds carry their own libstdc++ pieces;
# with it, any error message that c10 streams (SymInt, ints) segfaulted inside libstdc++'s locale
# code. The system GCC (13.3, same major) links against the shared libstdc++ torch uses: prefer it.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
if [ $PREBUILT = 1 ] && $PY -c 'import sys, flux_attention as fa; sys.exit(0 if fa.build_info().get("cuda") else 1)'; then
  echo "=== using the prebuilt extension: $($PY -c 'import flux_attention as fa; print(fa.build_info())')"
else
  step build $PY setup.py -q build_ext --inplace || { echo "build failed"; exit 1; }
  step cuda_compile_times $PY scripts/cuda_compile_check.py
fi

SEL="cuda"
[ $QUICK = 1 ] && SEL="cuda and not slow"
step pytest_cuda $PY -m pytest -q -m "$SEL" -p no:cacheprovider -rs --junitxml="$OUT/pytest_cuda.xml"
# A skip is not a pass: any skipped CUDA test fails the check.
if grep -q '<skipped' "$OUT/pytest_cuda.xml" 2>/dev/null; then
  names+=("no_skips"); results+=("FAIL (skipped CUDA tests: see pytest_cuda.log)")
fi

# The sm_90a kernels case by case against float64 references (each case reports and the run goes on).
step sm90_fwd_check timeout 300 $PY scripts/sm90_fwd_check.py $([ $QUICK = 1 ] && echo --quick)
step sm90_bwd_check timeout 300 $PY scripts/check_bwd_sm90.py --out-dir "$OUT"

if [ $SANITIZER = 1 ] && command -v compute-sanitizer >/dev/null; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitizer_cases.py
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 3 $PY scripts/sanitizer_cases.py --small
fi

if [ $BENCH = 1 ]; then
  for b in bench/attention.py bench/decode.py bench/decode_linear.py; do
    [ -f "$b" ] && step "bench_$(basename "$b" .py)" $PY "$b" $([ $QUICK = 1 ] && echo --quick) --out-dir "$OUT"
  done
fi
[ $E2E = 1 ] && step bench_e2e timeout 450 $PY bench/e2e.py $([ $QUICK = 1 ] && echo --quick) --out-dir "$OUT"
# Every issue-10 check in one run, with the fused model ops (flux_attention.fuse_ops) and the
# sdpa_fused anchor: all lengths, batches 1 and 4, the largest batch (~320 s on the H200).
[ $E2E = 1 ] && [ $QUICK = 0 ] && step bench_e2e_fused timeout 570 $PY bench/e2e.py --fused-ops --budget-s 500 \
  --name e2e_h200_fused_full --out-dir "$OUT"
# Where the end-to-end time goes: per-layer kernel time by category of a 128K prefill and decode step.
[ $E2E = 1 ] && step bench_e2e_profile timeout 200 $PY bench/e2e_profile.py --out-dir "$OUT"
[ $TRAIN = 1 ] && step train_check env PYTHON=$PY bash scripts/train_gpu_check.sh

echo
echo "=== summary ($(head -2 "$OUT/gpu.txt" | tail -1 | cut -d, -f1))"
status=0
for i in "${!names[@]}"; do
  printf '  %-22s %s\n' "${names[$i]}" "${results[$i]}"
  case "${results[$i]}" in pass*) ;; *) status=1 ;; esac
done
exit $status
