#!/usr/bin/env bash
# One command for the H200 machine (no network): build the extension with CUDA, run the test suite
# on CUDA, run compute-sanitizer on small shapes, run the benchmarks, print a summary table.
#   scripts/gpu_check.sh [--quick] [--no-bench] [--no-sanitizer]
# Logs and results go to $OUT (the device tool's output folder) or /tmp/flux-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flux-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for every tool below
PY=${PY:-python3}
QUICK=0; BENCH=1; SANITIZER=1
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    --no-bench) BENCH=0 ;;
    --no-sanitizer) SANITIZER=0 ;;
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
step build $PY setup.py -q build_ext --inplace || { echo "build failed"; exit 1; }
step cuda_compile_times $PY scripts/cuda_compile_check.py

SEL="cuda"
[ $QUICK = 1 ] && SEL="cuda and not slow"
step pytest_cuda $PY -m pytest -q -m "$SEL" -p no:cacheprovider -rs --junitxml="$OUT/pytest_cuda.xml"
# A skip is not a pass: any skipped CUDA test fails the check.
if grep -q '<skipped' "$OUT/pytest_cuda.xml" 2>/dev/null; then
  names+=("no_skips"); results+=("FAIL (skipped CUDA tests: see pytest_cuda.log)")
fi

if [ $SANITIZER = 1 ] && command -v compute-sanitizer >/dev/null; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitizer_cases.py
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 3 $PY scripts/sanitizer_cases.py --small
fi

if [ $BENCH = 1 ]; then
  for b in bench/attention.py bench/decode.py; do
    [ -f "$b" ] && step "bench_$(basename "$b" .py)" $PY "$b" $([ $QUICK = 1 ] && echo --quick) --out-dir "$OUT"
  done
fi

echo
echo "=== summary ($(head -2 "$OUT/gpu.txt" | tail -1 | cut -d, -f1))"
status=0
for i in "${!names[@]}"; do
  printf '  %-22s %s\n' "${names[$i]}" "${results[$i]}"
  case "${results[$i]}" in pass*) ;; *) status=1 ;; esac
done
exit $status
