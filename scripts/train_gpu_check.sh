#!/usr/bin/env bash
# Router training on one H200, for the lead to run once after building the extension (no network,
# <= 5 minutes). Every step reports its own failure and the script goes on; a summary table ends it.
#
#   bash scripts/train_gpu_check.sh            # results under $OUT (default ./out) and bench/results/
#
# 1. Throughput of configs/llama3_8b.yaml (random Llama-3.1-8B-shaped weights, bf16) at 64K-token
#    packs (one 65,536-token sequence per pack): tokens/s/GPU, step time, peak memory, TFLOP/s
#    against the step's FLOP count, host syncs per step. ~200 s (1 warmup step + timed steps until
#    the time budget). Falls back to 32K packs if the 64K run fails.
# 2. Kill/resume on configs/tiny_cuda.yaml (deterministic): SIGKILL after step 7 of 12, resume,
#    resumed losses bitwise equal to an uninterrupted run. ~40 s.
# 3. CUDA unit tests of the training blocks (routed mix, fused head loss) vs float64 references. ~20 s.
#
# On 2 or 4 GPUs (not part of this script):
#   python bench/train_throughput.py --config configs/llama3_8b.yaml --steps 3 --nproc 1,2,4 --out $OUT
#   python bench/train_throughput.py --config configs/llama3_8b.yaml --steps 2 --nproc 2 \
#       --name train_llama3_8b_128k_cp2 --dist.context_parallel=2 --data.pack_tokens=131072 --out $OUT
#   python scripts/train_parallel_check.py --config configs/tiny_cuda.yaml --nproc 2 --out $OUT
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" bench/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
LOG="$OUT/train_gpu_check.log"
: > "$LOG"
declare -a ROWS
row() { ROWS+=("| $1 | $2 | $3 |"); }
run() {  # run NAME TIMEOUT CMD...: output to the log and the terminal, status in the summary
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  row "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)")" "$((SECONDS - t0)) s"
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

# 1. 8B-shaped throughput at 64K packs (PYTORCH_CUDA_ALLOC_CONF: fewer fragmentation OOMs at 64K).
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
if ! run "llama3_8b 64K throughput" 230 "$PY" bench/train_throughput.py --config configs/llama3_8b.yaml \
    --name train_llama3_8b_64k_1gpu --steps 4 --warmup 1 --time-budget-s 180 --count-syncs --out "$OUT"; then
  if [ "$SECONDS" -lt 170 ]; then
    run "llama3_8b 32K throughput (fallback)" 100 "$PY" bench/train_throughput.py --config configs/llama3_8b.yaml \
      --name train_llama3_8b_32k_1gpu --steps 1 --warmup 1 --time-budget-s 80 --out "$OUT" --data.pack_tokens=32768
  fi
fi

# 2. kill / resume, bitwise
if [ "$SECONDS" -lt 245 ]; then
  run "kill/resume (tiny_cuda)" 50 "$PY" scripts/train_resume_check.py --config configs/tiny_cuda.yaml --out "$OUT"
else
  row "kill/resume (tiny_cuda)" "skipped: out of time" "-"
fi

# 3. CUDA unit tests of the training blocks
if [ "$SECONDS" -lt 275 ]; then
  run "pytest -m cuda test_train_ops" 25 "$PY" -m pytest -q -x -m cuda tests/python/test_train_ops.py
else
  row "pytest -m cuda test_train_ops" "skipped: out of time" "-"
fi

{
  echo
  echo "## train_gpu_check summary ($SECONDS s)"
  echo "| step | status | time |"
  echo "|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  for f in "$OUT"/train_llama3_8b_*_1gpu.md; do [ -f "$f" ] && { echo; tail -n +3 "$f"; }; done
  if [ -f "$OUT/train_llama3_8b_64k_1gpu.json" ]; then
    "$PY" - "$OUT/train_llama3_8b_64k_1gpu.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
for r in doc["results"]:
    if "error" in r:
        print("error:", r["error"]); continue
    syncs = r.get("host_syncs", {})
    print(f"\ntokens/s/GPU {r['tokens_per_s_per_device']:,.0f} (goal 4,500) | step {r['step_time_s']:.2f} s "
          f"(steps {', '.join(f'{t:.2f}' for t in r['step_times_s'])}) | peak {r['peak_mem_gib']:.1f} GiB allocated, "
          f"{r.get('peak_reserved_gib', 0):.1f} reserved (estimate {r['peak_mem_estimate_gib']['total']:.0f}) | "
          f"{r.get('tflops_per_device', 0):.0f} TFLOP/s of {r.get('flops_per_token', 0) / 1e9:.1f} GFLOP/token | "
          f"host syncs in the warmup step: {syncs.get('syncs_per_step', '?')} {syncs.get('where', '')}")
EOF
  fi
} 2>&1 | tee -a "$LOG"
