#!/usr/bin/env bash
# The GPU config of the main job (configs/smollm2.yaml) on one GPU: train SmolLM2-135M-Instruct's
# Layer Routers, then evaluate all-FA / Flux / all-SA on the synthetic suite at 4K tokens and time
# prefill and decode, all through `python -m flux_attention.eval.demo`. The report (report.md,
# results.json, routing_heatmap.png, speed.png, training.png, router.safetensors) lands in
# $OUT/smollm2/<timestamp>/.
#   scripts/smollm2_gpu_check.sh [--max-train-s S] [--samples N] [demo flags or --section.key=value ...]
# On a machine without network (the H200 box), scripts/smollm2_stage.sh finds or stages the model
# (parts carried in .model/ on consecutive calls) and the Python packages it lacks (wheels in .whl/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flux-smollm2}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

source scripts/smollm2_stage.sh

MAX_TRAIN_S=${MAX_TRAIN_S:-1800}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -m flux_attention.eval.demo --config configs/smollm2.yaml --out "$OUT/smollm2" \
  --max-train-s "$MAX_TRAIN_S" --lengths 4096 --samples 8 --speed-lengths 2048 4096 8192 \
  "--model.name=$model" "${tb[@]}" "$@"
