#!/usr/bin/env bash
# Host-only (no GPU) check of the sm90 backward's layout algebra: tests/cuda/sm90_bwd_layouts.cu.
# Needs nvcc and the CUTLASS headers (CUTLASS_DIR, else the nvidia-cutlass wheel of $PY).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -n "${CUTLASS_DIR:-}" ]; then INC=$CUTLASS_DIR/include; else
  INC=$($PY -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))')
fi
out=${TMPDIR:-/tmp}/flux_sm90_bwd_layouts
nvcc -std=c++17 --expt-relaxed-constexpr -arch=sm_90a -O1 -I"$INC" -Icsrc/include -Icsrc/cuda \
  tests/cuda/sm90_bwd_layouts.cu -o "$out"
"$out"
