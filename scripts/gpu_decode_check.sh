#!/usr/bin/env bash
# Issue 5 (decode) on one H200, after the extension is built in place: the CUDA decode / append /
# cache tests, then bench/decode.py (which writes h200_decode.json). About 3 minutes; each step is
# time-limited and the next one runs whatever happened. Logs and JSON go to $OUT.
#   scripts/gpu_decode_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flux-decode-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
echo "=== pytest -m cuda (decode, append_kv, cache)"
timeout 110 $PY -m pytest -q -m cuda -p no:cacheprovider -rs --durations=8 --junitxml="$OUT/pytest_decode.xml" \
  tests/python/test_decode.py tests/python/test_append_kv.py tests/python/test_cache.py \
  tests/python/test_opcheck_compile.py::test_opcheck_decode 2>&1 | tee "$OUT/pytest_decode.log" | tail -45
tests_rc=${PIPESTATUS[0]}
echo "=== bench/decode.py"
timeout 120 $PY bench/decode.py --out-dir "$OUT" 2>&1 | tee "$OUT/bench_decode.log" | grep -v "^\[" | tail -80
bench_rc=${PIPESTATUS[0]}
echo "=== decode check: pytest rc=$tests_rc, bench rc=$bench_rc (124 = time limit; see $OUT/*.log)"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
